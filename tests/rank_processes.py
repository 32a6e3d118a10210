"""Running rank processes for the two-process tests (tests/test_distributed.py,
tests/callbacks/test_distributed_averages.py)."""

from __future__ import annotations

import socket
import time
from multiprocessing.process import BaseProcess


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on now (for MASTER_PORT)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_to_the_end(procs: list[BaseProcess], timeout: float) -> None:
    """Start ``procs`` and wait for all of them to exit 0.

    A rank that fails leaves the others waiting in a collective, so every rank is stopped at the
    first failure (or after ``timeout`` seconds) and the test fails with the exit codes.
    """
    for p in procs:
        p.start()
    deadline = time.monotonic() + timeout
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        if any(p.exitcode not in (None, 0) for p in procs):
            break
        time.sleep(0.2)
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    codes = [p.exitcode for p in procs]
    assert codes == [0] * len(procs), \
        f"rank processes ended with {codes} (negative: killed after a failure or {timeout:.0f} s); see stderr"
