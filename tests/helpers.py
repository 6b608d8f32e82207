"""Helpers the end-to-end tests share: waiting for a condition, running the CLI."""
import os
import subprocess
import sys
import time


def wait_for(predicate, timeout: float = 10.0) -> bool:
    """Poll predicate until it holds (True) or timeout seconds pass (False)."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(0.005)
    return False


def hv(*args, env=None, timeout=60) -> subprocess.CompletedProcess:
    """`python -m hypervisor ARGS` as a user runs it: text output, exit status."""
    return subprocess.run([sys.executable, "-m", "hypervisor", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})})
