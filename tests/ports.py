"""A free local TCP port, for tests and the benchmarks that reuse their helpers (a module of its
own: tests/conftest.py sets environment variables on import, which a benchmark must not get)."""

import socket


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (a gloo rendezvous, a local server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
