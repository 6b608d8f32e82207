"""Many domains in one process: what each costs the host, and whether they keep time.

blocked_domains(n, engine): n domains of 16 MiB whose guests block at once (SCHEDOP_block
with nothing to wake them): how long creating them took, the host memory (RSS) and the
threads each adds, the CPU the process uses while they all sit idle, the domids used.

ticking_domains(n, engine, seconds): n PV kernels ticking at 100 Hz (interactive mode):
the ticks each one saw per second (from its SCHEDOP_block count, one per tick).
"""
from __future__ import annotations

import os
import statistics
import time

from abi import C

from .domain import Domain

SCALE_DOMAIN_MIB = 16


def _blocking_guest() -> bytes:
    from guest_kernel.runtime import PVProgram
    p = PVProgram(guest_os="trapless-bench-blocked")
    p.a.label("again")
    p.hypercall("sched_op", C.SCHEDOP_block, 0)
    p.a.jmp("again")
    return p.elf()


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _thread_names() -> list[str]:
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as f:
                names.append(f.read().strip())
        except OSError:
            pass                                # a thread that ended meanwhile
    return names


def _process_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def blocked_domains(n: int, engine: str | None, idle_s: float = 3.0,
                    first_domid: int = 1) -> dict:
    image = _blocking_guest()
    rss0, threads0 = _rss_kib(), len(_thread_names())
    doms: list[Domain] = []
    t0 = time.monotonic()
    try:
        for i in range(n):
            dom = Domain(image, memory_mib=SCALE_DOMAIN_MIB, engine=engine,
                         domid=first_domid + i)
            doms.append(dom)
            dom.start()
        created_s = time.monotonic() - t0
        deadline = time.monotonic() + 60
        while any(d.vcpu_state != "blocked" for d in doms) and time.monotonic() < deadline:
            time.sleep(0.05)
        blocked = sum(d.vcpu_state == "blocked" for d in doms)
        time.sleep(2.5)                         # idle workers of the scheduler end
        cpu0, wall0 = _process_cpu_s(), time.monotonic()
        time.sleep(idle_s)
        idle_cpu = (_process_cpu_s() - cpu0) / (time.monotonic() - wall0)
        names = _thread_names()
        kvm_tasks = sum(name.startswith("kvm-") for name in names)
        result = {
            "engine": doms[0].engine if doms else engine,
            "domains": len(doms), "blocked": blocked,
            "domids": [doms[0].domid, doms[-1].domid] if doms else [],
            "create_s": round(created_s, 2),
            "rss_mib_per_domain": round((_rss_kib() - rss0) / 1024 / max(len(doms), 1), 3),
            # (a thread the process had before may have ended meanwhile: not below 0)
            "threads": max(len(names) - threads0, 0),
            "threads_per_domain": round(max(len(names) - threads0, 0) / max(len(doms), 1), 3),
            "kvm_tasks": kvm_tasks,             # KVM's own per-VM tasks (NX recovery)
            "idle_cpu_percent_of_a_core": round(100 * idle_cpu, 2),
        }
    finally:
        for dom in doms:
            dom.destroy()
    return result


def ticking_domains(n: int, engine: str | None, seconds: float = 10.0) -> dict:
    from guest_kernel.pv_kernel import build_pv_kernel
    image = build_pv_kernel()
    doms = [Domain(image, memory_mib=SCALE_DOMAIN_MIB, cmdline="interactive", engine=engine,
                   domid=i + 1) for i in range(n)]
    try:
        for dom in doms:
            dom.start()
        time.sleep(1.0)                          # past the banner, ticking
        before = [d.counters().hypercalls.get("sched_op", 0) for d in doms]
        t0 = time.monotonic()
        time.sleep(seconds)
        after = [d.counters().hypercalls.get("sched_op", 0) for d in doms]
        span = time.monotonic() - t0
    finally:
        for dom in doms:
            dom.destroy()
    rates = sorted((a - b) / span for a, b in zip(after, before))
    return {"engine": doms[0].engine, "domains": n, "seconds": round(span, 1),
            "ticks_per_s_min": round(rates[0], 1),
            "ticks_per_s_median": round(statistics.median(rates), 1),
            "stalled": sum(r == 0 for r in rates)}


def measure(domains: int, engine: str | None, ticking: int = 100) -> dict:
    """Both measures on each engine to measure (or the one asked for)."""
    from . import engines
    names = [engine] if engine else engines.available()
    out: dict = {"domains": domains, "engines": names}
    for name in names:
        out[name] = {"blocked": blocked_domains(domains, name)}
        if name == "bt" and ticking:
            out[name]["ticking"] = ticking_domains(ticking, name)
    return out


def scale_table(r: dict):
    from rich.table import Table
    table = Table(title=f"{r['domains']:,} blocked domains of {SCALE_DOMAIN_MIB} MiB in one "
                        f"process")
    table.add_column("what")
    for name in r["engines"]:
        table.add_column(name, justify="right")
    rows = (("created (domids)", lambda b: f"{b['domains']:,} ({b['domids'][0]}-{b['domids'][1]})"),
            ("time to create them all, s", lambda b: f"{b['create_s']:.1f}"),
            ("host RSS per domain, MiB", lambda b: f"{b['rss_mib_per_domain']:.3f}"),
            ("host threads per domain", lambda b: f"{b['threads_per_domain']:.3f}"),
            ("... of them KVM's own per-VM tasks", lambda b: f"{b['kvm_tasks']:,}"),
            ("CPU while all idle, % of a core", lambda b: f"{b['idle_cpu_percent_of_a_core']:.2f}"))
    for what, show in rows:
        table.add_row(what, *(show(r[n]["blocked"]) for n in r["engines"]))
    for name in r["engines"]:
        t = r[name].get("ticking")
        if t:
            table.add_row(f"{t['domains']} PV kernels ticking at 100 Hz on {name}: ticks/s "
                          f"min / median ({t['seconds']:g} s)",
                          *(f"{t['ticks_per_s_min']:.1f} / {t['ticks_per_s_median']:.1f}"
                            if n == name else "" for n in r["engines"]))
    return table
