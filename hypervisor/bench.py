"""`python -m hypervisor bench`: what the hypercall path and the services cost.

- the PV CPU model's paths, from ring 3 (where a Xen PV kernel runs), on the engine
  asked for or on every available one: a bare exit (`out` to an unclaimed port that the
  guest's TSS I/O bitmap opens to ring 3; a PVH guest, as no Xen PV kernel can exit
  bare), the null hypercall xen_version(XENVER_version), an exception bounce (`int3`
  to the trap table's #BP handler, which returns with the iret hypercall) and a
  guest-user syscall bounce (user `syscall` to the kernel's syscall callback, back with
  iret and VGCF_in_syscall), the same from 32-bit compat-mode user code (on kvm that
  code runs on the vCPU's Unicorn twin: each round trip moves the vCPU there and back),
  each as ns per iteration (a run of N minus a run of 1,
  so boot is left out), as exits per iteration and as multiples of the bare exit;
  rounds alternate so all see the same machine; the median round is reported, and the
  median of each round's ratio to that round's bare exit. Each
  also as the CPU time the process spent per iteration (likewise N minus 1), which a
  machine shared with other work moves far less than the wall clock.
- timer lateness: delivery minus deadline of one-shot timers 1 ms ahead, as the guest
  sees it through the PV clock; median and p99, and as multiples of one bare exit.
- upcall latency: from just before EVTCHNOP_send (an IPI to itself) to the guest's
  handler, likewise.
- clock read: two back-to-back PV-clock reads; both latencies above include one read.
- mmu_update: 512 PTE writes in one hypercall vs 512 single-entry hypercalls.
- engines side by side (when no --engine is given): the null hypercall round trip and
  the compute workload on every available engine (kvm, bt), interleaved in one run,
  with the bt/kvm ratios.
- PV CPU models side by side (likewise): the same two as a ring-0 PV kernel and under
  Xen's PV CPU model (ring 3), on every engine.
"""
from __future__ import annotations

import json
import statistics
import struct
import sys
import time

from rich.console import Console
from rich.table import Table

from guest_kernel import workloads, xen_pv

from . import bench_startup
from .domain import Domain
from .errors import TraplessError

ROUNDS = 9


def time_guest(image: bytes, iterations: int, engine: str | None) -> float:
    """ns per iteration of one run of `image` (whole run, boot included)."""
    with Domain(image, memory_mib=16, engine=engine) as dom:
        stop = dom.run(timeout=120)
        if stop.kind != "shutdown" or stop.reason != 0:
            raise TraplessError(f"benchmark guest did not power off: {stop.kind} {stop.message}")
        return stop.elapsed_ns / iterations


def sampled(image: bytes, samples: int, engine: str | None) -> list[int]:
    """Run a measuring guest; return its samples[] array (ns) read from guest memory."""
    from .image import load_image
    with Domain(image, memory_mib=16, engine=engine) as dom:
        stop = dom.run(timeout=120)
        if stop.kind != "shutdown" or stop.reason != 0:
            raise TraplessError(f"benchmark guest did not power off: {stop.kind} {stop.message}")
        base = load_image(image, 16 << 20).symbols["samples"]
        raw = dom.read_guest(base, 8 * samples)
    return list(struct.unpack(f"<{samples}q", raw))


# The PV CPU model's paths (pv_paths): name, what (short: a table column; the module's
# docstring says more), guest of n iterations.
PV_PATHS = (
    ("bare_exit", "bare exit (`out`)", workloads.ring3_bare_exit_loop),
    ("hypercall", "hypercall (xen_version)", lambda n: workloads.hypercall_loop(n, xen_pv=True)),
    ("exception_bounce", "#BP bounce + iret", workloads.exception_bounce_loop),
    ("syscall_bounce", "user syscall bounce + iret", workloads.syscall_bounce_loop),
    ("compat_syscall_bounce", "compat syscall bounce + iret", xen_pv.compat_roundtrip_guest),
)


def run_counted(image: bytes, engine: str | None) -> tuple[int, int, int]:
    """One run of a guest that powers off: (wall ns, CPU ns of this process, exits).
    The CPU time covers the domain's creation and teardown too, the same in every run,
    so a difference of two runs leaves the guest's own."""
    cpu = time.process_time_ns()
    with Domain(image, memory_mib=16, engine=engine) as dom:
        stop = dom.run(timeout=600)
        if stop.kind != "shutdown" or stop.reason != 0:
            raise TraplessError(f"benchmark guest did not power off: {stop.kind} {stop.message}")
        return stop.elapsed_ns, time.process_time_ns() - cpu, dom.counters().total_exits


def paired_ratio(times: list[float], bare: list[float]) -> float | None:
    """The median over rounds of a path's time over the bare exit's time in the same
    round (None where no round left the bare exit any time: a short run's noise). This host's speed drifts by up to 2x over a second or so (the same bare-exit
    loop, sampled every 250 ms: 88-160 ns): two runs a few ms apart see the same
    machine, two medians taken over a whole run need not."""
    ratios = [t / b for t, b in zip(times, bare) if b > 0]
    return round(statistics.median(ratios), 3) if ratios else None


def pv_paths(iterations: int, engine: str | None, rounds: int = ROUNDS) -> dict:
    """ns (wall clock and process CPU time) and exits per iteration of each of PV_PATHS
    (a run of `iterations` minus a run of 1), the median of `rounds` alternating rounds,
    and each over the bare exit of its own round (paired_ratio)."""
    from .engines import compat_mode_unavailable
    images = {name: (build(1), build(iterations)) for name, _, build in PV_PATHS
              if name != "compat_syscall_bounce" or not compat_mode_unavailable(engine)}
    ns = {name: [] for name in images}
    cpu_ns = {name: [] for name in images}
    exits = {}
    for _ in range(rounds):
        for name, (one, many) in images.items():
            t1, c1, e1 = run_counted(one, engine)
            tn, cn, en = run_counted(many, engine)
            ns[name].append((tn - t1) / (iterations - 1))
            cpu_ns[name].append((cn - c1) / (iterations - 1))
            exits[name] = round((en - e1) / (iterations - 1), 3)
    out = {"iterations": iterations, "rounds": rounds}
    for name in images:
        out[name] = {"ns": round(statistics.median(ns[name]), 1), "exits": exits[name],
                     "x_bare_exit": paired_ratio(ns[name], ns["bare_exit"]),
                     "cpu_ns": round(statistics.median(cpu_ns[name]), 1),
                     "cpu_x_bare_exit": paired_ratio(cpu_ns[name], cpu_ns["bare_exit"])}
    return out


def pv_paths_table(r: dict) -> Table:
    iterations = sorted({r[e]["iterations"] for e in r["engines"]})
    table = Table(title="Xen's PV CPU model, from ring 3: each path against a bare exit "
                        "from ring 3 (same run, ns per iteration of "
                        f"{' / '.join(f'{n:,}' for n in iterations)}; the median round)")
    for col in ("engine", "what", "exits each", "ns each", "/ bare exit", "CPU ns each",
                "CPU / bare exit"):
        table.add_column(col, justify="left" if col in ("engine", "what") else "right")
    for engine in r["engines"]:
        e = r[engine]
        for name, what, _ in PV_PATHS:
            if name not in e:
                continue                # compat code, where the engine cannot run it
            x, cpu_x = e[name]["x_bare_exit"], e[name]["cpu_x_bare_exit"]
            table.add_row(engine, what, f"{e[name]['exits']:g}",
                          f"{e[name]['ns']:.1f}", "-" if x is None else f"{x:.3f}",
                          f"{e[name]['cpu_ns']:.1f}", "-" if cpu_x is None else f"{cpu_x:.3f}",
                          style="bold" if name != "bare_exit" else None)
    return table


def mmu_batch_vs_single(engine: str | None, entries: int = 512) -> dict:
    """Exits and guest-measured time of 512 PTE updates: one hypercall vs 512."""
    from .image import load_image
    out = {}
    for key, batched in (("batched", True), ("single", False)):
        image = workloads.mmu_update_batch(batched, entries)
        with Domain(image, memory_mib=16, engine=engine) as dom:
            stop = dom.run(timeout=120)
            if stop.kind != "shutdown" or stop.reason != 0:
                raise TraplessError(f"benchmark guest did not power off: {stop.message}")
            base = load_image(image, 16 << 20).symbols["samples"]
            ns = struct.unpack("<q", dom.read_guest(base, 8))[0]
            c = dom.counters()
            out[key] = {"mmu_update_calls": c.hypercalls.get("mmu_update", 0),
                        "exits": c.total_exits, "ns": ns}
    out["entries"] = entries
    out["time_ratio_single_over_batched"] = round(out["single"]["ns"] / out["batched"]["ns"], 2)
    return out


def compute_ns_per_round(engine: str, target_ms: float, rounds: int,
                         start: int = 100_000, image=None) -> tuple[float, int]:
    """ns per round of the compute workload on one engine, and the rounds used: the count
    doubles until a run takes target_ms beyond a 1-round run (boot and teardown), so a
    fast engine and a slow one are both measured over a span long enough to time.
    image(n): the guest of n rounds (default: compare_workloads' PV compute guest)."""
    from guest_kernel import compare_workloads
    image = image or (lambda n: compare_workloads.build("compute", "pv", n))

    def run_ns(n: int) -> int:
        with Domain(image(n), memory_mib=16, engine=engine) as dom:
            stop = dom.run(timeout=600)
            if stop.kind != "shutdown" or stop.reason != 0:
                raise TraplessError(f"compute guest did not power off: {stop.kind} {stop.message}")
            return stop.elapsed_ns

    # The boot-and-teardown baseline is the least disturbed of a few 1-round runs: one
    # run taken on a busy moment must not make a span shorter than its work (or negative).
    boot = min(run_ns(1) for _ in range(max(rounds, 3)))
    n = start
    while n < 400_000_000 and run_ns(n) - boot < target_ms * 1e6:
        n *= 2
    spans = [run_ns(n) - boot for _ in range(rounds)]
    return statistics.median(spans) / n, n


def side_by_side(iterations: int, rounds: int = 3, target_ms: float = 200,
                 compute_start: int = 100_000) -> dict:
    """The null hypercall (Xen's PV model) and the compute workload on every available
    engine."""
    from . import engines
    names = engines.available()
    hyper_img = workloads.hypercall_loop(iterations, xen_pv=True)
    hyper = {name: [] for name in names}
    for _ in range(rounds):                     # interleaved: both see the same machine
        for name in names:
            hyper[name].append(time_guest(hyper_img, iterations, name))
    out = {"engines": names, "iterations": iterations}
    for name in names:
        ns, n = compute_ns_per_round(name, target_ms, rounds, compute_start)
        out[name] = {"hypercall_ns": round(statistics.median(hyper[name]), 1),
                     "compute_ns_per_round": round(ns, 3), "compute_rounds": n}
    if "kvm" in out and "bt" in out:
        out["hypercall_ratio_bt_over_kvm"] = round(out["bt"]["hypercall_ns"] / out["kvm"]["hypercall_ns"], 6)
        out["compute_ratio_bt_over_kvm"] = round(out["bt"]["compute_ns_per_round"] /
                                                 out["kvm"]["compute_ns_per_round"], 6)
    return out


def cpu_models(iterations: int, rounds: int = 3, target_ms: float = 200) -> dict:
    """The null hypercall and the compute loop as a ring-0 PV kernel and under Xen's PV
    CPU model (ring 3), on every available engine."""
    from . import engines
    out = {"engines": engines.available(), "iterations": iterations}
    for engine in out["engines"]:
        r = {}
        for model, xen in (("ring0", False), ("xen_pv", True)):
            img = workloads.hypercall_loop(iterations, xen_pv=xen)
            hyper = statistics.median(time_guest(img, iterations, engine) for _ in range(rounds))
            ns, n = compute_ns_per_round(engine, target_ms, rounds, 10_000,
                                         lambda k, xen=xen: workloads.compute_loop(k, xen))
            r[model] = {"hypercall_ns": round(hyper, 1), "compute_ns_per_round": round(ns, 3),
                        "compute_rounds": n}
        r["hypercall_ratio_xen_over_ring0"] = round(r["xen_pv"]["hypercall_ns"] /
                                                    r["ring0"]["hypercall_ns"], 3)
        r["compute_ratio_ring0_over_xen"] = round(r["ring0"]["compute_ns_per_round"] /
                                                  r["xen_pv"]["compute_ns_per_round"], 3)
        out[engine] = r
    return out


def cpu_models_table(r: dict) -> Table:
    table = Table(title="PV CPU models: ring-0 kernel vs Xen's (ring 3), same run")
    for col in ("engine", "what", "ring 0", "Xen PV (ring 3)", "ratio"):
        table.add_column(col, justify="left" if col in ("engine", "what") else "right")
    for engine in r["engines"]:
        e = r[engine]
        table.add_row(engine, "null hypercall round trip, ns", f"{e['ring0']['hypercall_ns']:.1f}",
                      f"{e['xen_pv']['hypercall_ns']:.1f}",
                      f"{e['hypercall_ratio_xen_over_ring0']:.3g} (Xen / ring 0)")
        table.add_row(engine, "compute loop, ns per round",
                      f"{e['ring0']['compute_ns_per_round']:.3f}",
                      f"{e['xen_pv']['compute_ns_per_round']:.3f}",
                      f"{e['compute_ratio_ring0_over_xen']:.4g} (ring 0 / Xen)", style="bold")
    return table


def side_by_side_table(r: dict) -> Table:
    names = r["engines"]
    both = "compute_ratio_bt_over_kvm" in r
    table = Table(title="engines side by side (same run)")
    table.add_column("what")
    for name in names:
        table.add_column(name, justify="right")
    if both:
        table.add_column("bt / kvm", justify="right")
    table.add_row(f"null hypercall round trip, ns ({r['iterations']:,} calls)",
                  *(f"{r[n]['hypercall_ns']:.1f}" for n in names),
                  *([f"{r['hypercall_ratio_bt_over_kvm']:.3g}"] if both else []))
    table.add_row("compute workload (xorshift64), ns per round",
                  *(f"{r[n]['compute_ns_per_round']:.3f}" for n in names),
                  *([f"{r['compute_ratio_bt_over_kvm']:.3g}"] if both else []), style="bold")
    return table


def percentiles(values: list[int], bare_exit_ns: float) -> dict:
    ordered = sorted(values)
    median = statistics.median(ordered)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    return {"median_us": round(median / 1000, 2), "p99_us": round(p99 / 1000, 2),
            "median_x_bare_exit": round(median / bare_exit_ns, 2),
            "p99_x_bare_exit": round(p99 / bare_exit_ns, 2), "samples": len(values)}


def measure(iterations: int = 100_000, engine: str | None = None, rounds: int = ROUNDS,
            samples: int = 500) -> dict:
    """The hypercall/bare exit pair and the other paths of pv_paths on `engine` (None:
    every available engine, the first one's figures at the top level)."""
    from . import engines
    names = [engine] if engine else engines.available()
    paths = {"engines": names}
    for name in names:
        paths[name] = pv_paths(iterations, name, rounds)
    first = paths[names[0]]
    h, b = first["hypercall"]["ns"], first["bare_exit"]["ns"]
    return {"hypercall_ns": h, "bare_exit_ns": b, "ratio": first["hypercall"]["x_bare_exit"],
            "iterations": iterations, "rounds": rounds, "pv_paths": paths,
            "timer_lateness": percentiles(sampled(workloads.timer_lateness(samples), samples, engine), b),
            "upcall_latency": percentiles(sampled(workloads.upcall_latency(samples), samples, engine), b),
            "clock_read": percentiles(sampled(workloads.clock_read_cost(samples), samples, engine), b),
            "mmu_update_512": mmu_batch_vs_single(engine)}


def pv_paths_only(args) -> int:
    """`bench --pv-paths`: only the PV CPU model's rows, for tuning those paths."""
    from . import engines
    names = [args.engine] if args.engine else engines.available()
    result = {"engines": names}
    for name in names:
        result[name] = pv_paths(args.iterations, name, args.rounds or ROUNDS)
    if args.json:
        print(json.dumps({"pv_paths": result}))
    else:
        Console(file=sys.stdout).print(pv_paths_table(result))
    return 0


def main(args) -> int:
    if args.pv_paths:
        return pv_paths_only(args)
    result = measure(args.iterations, args.engine, args.rounds or ROUNDS, samples=args.samples)
    if args.engine is None:
        result["side_by_side"] = side_by_side(args.iterations)
        result["pv_cpu_models"] = cpu_models(min(args.iterations, 20_000))
    result["cold_start"] = bench_startup.cold_start(engine=args.engine)
    from . import bench_blk
    result["block"] = bench_blk.measure(args.engine)
    if args.domains:
        from .bench_scale import measure as measure_scale
        result["scale"] = measure_scale(args.domains, args.engine, ticking=args.ticking)
    if args.json:
        print(json.dumps(result))
        return 0
    console = Console(file=sys.stdout)
    console.print(pv_paths_table(result["pv_paths"]))
    lat = Table(title="event delivery as the guest sees it (PV clock)")
    for col in ("what", "median µs", "p99 µs", "median / bare exit", "p99 / bare exit"):
        lat.add_column(col, justify="right" if col != "what" else "left")
    for key, what in (("timer_lateness", "one-shot timer: delivery - deadline"),
                      ("upcall_latency", "EVTCHNOP_send to handler (IPI to self)"),
                      ("clock_read", "one PV-clock read (rdtsc + shared memory, no exit)")):
        r = result[key]
        lat.add_row(what, f"{r['median_us']:.2f}", f"{r['p99_us']:.2f}",
                    f"{r['median_x_bare_exit']:.2f}", f"{r['p99_x_bare_exit']:.2f}")
    console.print(lat)
    m = result["mmu_update_512"]
    mmu = Table(title=f"{m['entries']} page-table entries: one mmu_update vs one per entry")
    for col in ("how", "mmu_update calls", "exits (whole guest)", "µs (guest-measured)"):
        mmu.add_column(col, justify="right" if col != "how" else "left")
    for key, how in (("batched", "one hypercall, 512 entries"), ("single", "512 hypercalls, 1 entry each")):
        r = m[key]
        mmu.add_row(how, str(r["mmu_update_calls"]), str(r["exits"]), f"{r['ns'] / 1000:.1f}")
    mmu.add_row("time ratio single / batched", "", "", f"{m['time_ratio_single_over_batched']:.2f}",
                style="bold")
    console.print(mmu)
    if "side_by_side" in result:
        console.print(side_by_side_table(result["side_by_side"]))
    console.print(bench_startup.table(result["cold_start"]))
    console.print(bench_blk.table(result["block"]))
    if "scale" in result:
        from .bench_scale import scale_table
        console.print(scale_table(result["scale"]))
    if "pv_cpu_models" in result:
        console.print(cpu_models_table(result["pv_cpu_models"]))
    return 0
