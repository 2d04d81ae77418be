"""What learnsteps needs of the Hugging Face libraries around its own calls into them: whether the hub answers,
and diffusers' / transformers' loggers kept quiet while it loads or configures their objects."""
from __future__ import annotations

import contextlib
import os
import socket
import warnings


def hub_reachable(timeout: float = 3.0) -> bool:
    """Whether the Hugging Face hub answers a TCP connection (its endpoint from HF_ENDPOINT, if set)."""
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


@contextlib.contextmanager
def quiet_diffusers():
    """diffusers' and transformers' loggers at error level and their progress bars off for the duration: their
    notices (loading bars, config keys another class does not take, dtype advice) are not the user's business
    inside learnsteps' own calls. Afterwards each library is as the user left it (a bar the user turned off
    stays off)."""
    libs = []
    for name in ("diffusers", "transformers"):
        try:
            log = __import__(f"{name}.utils.logging", fromlist=["logging"])
        except ImportError:
            continue
        libs.append((log, log.get_verbosity(), log.is_progress_bar_enabled()))
        log.set_verbosity_error()
        log.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for log, level, bar in libs:
            log.set_verbosity(level)
            (log.enable_progress_bar if bar else log.disable_progress_bar)()
