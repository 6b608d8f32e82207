"""The guests `make bench` times for Xen's PV CPU model (guest_kernel/workloads.py), on
every engine: each takes exactly the exits its row claims, and powers off cleanly."""
import json

from guest_kernel import workloads

N = 50


def counted(run_guest, image):
    stop, console, dom = run_guest(image, memory_mib=16)
    assert (stop.kind, stop.reason) == ("shutdown", 0), f"{stop}\n{console}"
    c = dom.counters()
    return {k: v for k, v in c.exits.items() if v}, {k: v for k, v in c.hypercalls.items() if v}, c


def test_ring3_bare_exit_is_one_port_exit_per_out(run_guest, engine):
    exits, hypercalls, c = counted(run_guest, workloads.ring3_bare_exit_loop(N))
    # its own TSS opens the port to ring 3: each `out` is one exit to an unclaimed port,
    # not a #GP (the guest would report exception 13 and crash)
    assert exits["io"] == c.unknown_port_io == N
    # kvm keeps a PVH guest's TSS from KVM, so an event from ring 3 exits to trapless:
    # the closing int3 is one (and each `out`, judged by trapless against the bitmap,
    # is still one port exit); bt delivers the int3 inside the emulator
    assert exits.get("exception", 0) == (1 if engine == "kvm" else 0), repr(exits)
    # the 32-bit entry's console_io, then the shutdown
    assert hypercalls == {"console_io": 1, "sched_op": 1}


def test_exception_bounce_is_a_bounce_and_an_iret(run_guest):
    exits, hypercalls, _ = counted(run_guest, workloads.exception_bounce_loop(N))
    assert exits == {"exception": N, "hypercall": N + 2}
    assert hypercalls == {"set_trap_table": 1, "iret": N, "sched_op": 1}


def test_syscall_bounce_is_a_syscall_and_an_iret(run_guest):
    exits, hypercalls, _ = counted(run_guest, workloads.syscall_bounce_loop(N))
    # N user syscalls and the last one that ends the loop, N + 1 irets (the first enters
    # user mode), and the four set-up and shutdown hypercalls
    assert exits == {"hypercall": (N + 1) + (N + 1) + 4}
    assert hypercalls == {"mmuext_op": 1, "stack_switch": 1, "callback_op": 1, "iret": N + 1,
                          "sched_op": 1}


def test_bench_reports_each_path_against_the_bare_exit(engine):
    from hypervisor.bench import pv_paths, pv_paths_table
    from hypervisor.engines import compat_mode_unavailable
    r = pv_paths(200, engine, rounds=1)
    # the compat row where the engine runs compat code (kvm: with Unicorn for its twin)
    paths = ("bare_exit", "hypercall", "exception_bounce", "syscall_bounce") + (
        () if compat_mode_unavailable(engine) else ("compat_syscall_bounce",))
    assert [r[k]["exits"] for k in paths] == [1, 1, 2, 2, 2][:len(paths)]
    # times only: 200 iterations say little (none left, where the run of 1 took longer)
    assert r["bare_exit"]["x_bare_exit"] == (1.0 if r["bare_exit"]["ns"] > 0 else None)
    for k in paths:
        assert set(r[k]) == {"ns", "exits", "x_bare_exit", "cpu_ns", "cpu_x_bare_exit"}
    # the process's CPU time, its own multiple (none if the noise left no time at all)
    assert r["bare_exit"]["cpu_x_bare_exit"] == (1.0 if r["bare_exit"]["cpu_ns"] > 0 else None)
    table = pv_paths_table({"engines": [engine], engine: r})
    assert table.row_count == len(paths)
    json.dumps(r)


def test_block_bench_guest_times_both_parts_with_its_own_clock(engine, tmp_path):
    """bench_blk's guest reads then writes a 4 MiB image and reports each part's length
    from its PV clock; the host takes those figures, not when it saw the lines."""
    from hypervisor import bench_blk
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(4 << 20))
    run = bench_blk._guest_run(str(image), engine)
    assert run["engine"] == engine
    assert all(0 < run[what] < 60 for what in ("read", "write")), run
    # the backend's thread, found by its name, served the run and says how
    assert 0 < run["backend_cpu_s"] < 60 and 0 <= run["backend_wait_s"] < 600, run


def test_bench_pairs_each_round_with_its_own_bare_exit():
    from hypervisor.bench import paired_ratio
    # the machine slow in round 2 only: the rounds' ratios are 2, 2 and 2.6, their median
    # 2; the ratio of the two medians (260 / 100) would be 2.6
    assert paired_ratio([200.0, 400.0, 260.0], [100.0, 200.0, 100.0]) == 2.0
    assert paired_ratio([200.0, 400.0, 900.0], [100.0, 100.0, 100.0]) == 4.0   # the median round
    assert paired_ratio([200.0], [0.0]) is None       # no bare-exit time: no ratio


def test_bench_table_shows_a_missing_ratio_as_a_dash():
    from hypervisor.bench import pv_paths_table
    row = {"ns": -3.0, "exits": 1.0, "x_bare_exit": None, "cpu_ns": -2.5, "cpu_x_bare_exit": None}
    table = pv_paths_table({"engines": ["bt"], "bt": {"iterations": 200, "rounds": 1,
                                                      "bare_exit": row}})
    cells = {c.header: c._cells for c in table.columns}
    assert (cells["/ bare exit"], cells["CPU / bare exit"]) == (["-"], ["-"])
