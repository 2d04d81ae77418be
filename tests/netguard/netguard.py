"""Blocks the network for the test suite: imported by tests/conftest.py and, through sitecustomize.py on
PYTHONPATH, by every Python subprocess the tests start. Connections and name lookups are refused unless they stay on this machine
(loopback, Unix sockets: what gloo's DDP rendezvous and W&B's local service use)."""
import ipaddress
import socket

LOCAL_NAMES = {"localhost", "", None}


class NetworkBlocked(OSError):
    pass


def _local(host) -> bool:
    if host in LOCAL_NAMES or host == socket.gethostname():
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback or ipaddress.ip_address(host).is_unspecified
    except (ValueError, AttributeError):
        return False


def _check(address) -> None:
    if isinstance(address, (tuple, list)) and address and not _local(address[0]):
        raise NetworkBlocked(f"the tests may not reach the network (tried {address!r})")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def connect(self, address):
    _check(address)
    return _connect(self, address)


def connect_ex(self, address):
    _check(address)
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    h = host.decode() if isinstance(host, bytes) else host
    if not _local(h):
        raise NetworkBlocked(f"the tests may not reach the network (looked up {h!r})")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
