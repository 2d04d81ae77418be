import netguard  # noqa: F401  (Python imports sitecustomize at start-up: the Python subprocesses of the tests)
