"""Cold start: `python -m hypervisor run IMAGE` of a guest that powers off at once, against
a bare `python -c pass` of the same interpreter (the goal: at most 4x).

Both are timed as whole processes, alternately, after one warm-up run of each; the
median of each is reported with the ratio. Also `python -m hypervisor.bench_startup`.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUNS = 7


def tiny_guest() -> bytes:
    """A PV guest whose main returns 0 at once: poweroff."""
    from guest_kernel.asm import rax
    from guest_kernel.runtime import PVProgram

    p = PVProgram(guest_os="cold-start")
    p.a.mov(rax, 0)
    p.a.ret()
    return p.elf()


def _seconds(argv: list[str], env: dict) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - t0


def cold_start(runs: int = RUNS, engine: str | None = None) -> dict:
    """Median wall seconds of `run` and of `python -c pass`, and their ratio."""
    # A user's Python caches bytecode; without the cache every import is compiled and
    # the figure would measure the compiler, not trapless.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    with tempfile.TemporaryDirectory(prefix="trapless-cold-") as tmp:
        image = Path(tmp) / "poweroff.elf"
        image.write_bytes(tiny_guest())
        run = [sys.executable, "-m", "hypervisor", "run", str(image)]
        run += ["--engine", engine] if engine else []
        bare = [sys.executable, "-c", "pass"]
        _seconds(run, env), _seconds(bare, env)          # warm-up: caches, page cache
        times: dict[str, list[float]] = {"run": [], "bare": []}
        for _ in range(runs):
            times["run"].append(_seconds(run, env))
            times["bare"].append(_seconds(bare, env))
    run_s, bare_s = statistics.median(times["run"]), statistics.median(times["bare"])
    return {"runs": runs, "command": " ".join(["python -m hypervisor run poweroff.elf"] + run[5:]),
            "run_ms": run_s * 1e3, "python_pass_ms": bare_s * 1e3, "ratio": run_s / bare_s}


def table(r: dict):
    """The figures as a rich Table, for `make bench`."""
    from rich.table import Table

    t = Table(title=f"cold start, median of {r['runs']} runs each")
    t.add_column("process")
    t.add_column("ms", justify="right")
    t.add_row(r["command"], f"{r['run_ms']:.1f}")
    t.add_row("python -c pass", f"{r['python_pass_ms']:.1f}")
    t.add_row("ratio (goal: at most 4)", f"{r['ratio']:.2f}", style="bold")
    return t


if __name__ == "__main__":
    from rich.console import Console
    Console().print(table(cold_start()))
