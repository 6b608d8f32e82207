"""The bt engine: the same guests without KVM, by binary translation.

Most tests run on every available engine, because the point is that a guest cannot tell
kvm from bt: exceptions reach its IDT with the same vector, error code, cr2 and rip;
interrupts arrive as soon as it can take them, even in a loop that never exits; hlt with
interrupts off is the same fault. The bt-only tests check what the translator adds:
each sensitive instruction becomes one trap in the same counters as kvm's exits.
"""
import os
import subprocess
import sys

import pytest

from abi import C, offsetof
from guest_kernel import compare_workloads
from guest_kernel.asm import (cr2, cr3, dword, eax, ebx, ecx, edi, edx, ptr, qword, r12, rax, rbx,
                              rcx, rdx, rip, rsi, rsp)
from guest_kernel.conformance import ConformanceGuest, parse
from guest_kernel.pvlib import UPCALL_MASK, set_port_handler
from hypervisor import engines
from hypervisor.image import load_image

needs_bt = pytest.mark.skipif(engines.why_unavailable("bt") is not None,
                              reason=f"bt engine unavailable: {engines.why_unavailable('bt')}")

UNMAPPED = 0x7F00_0000_0000             # nothing is mapped up there
NON_CANONICAL = 0x8000_0000_0000_0000
ENTRY = 32                              # bytes per logged exception


def run(run_guest, image, **kw):
    stop, console, dom = run_guest(image, **kw)
    assert (stop.kind, stop.reason) == ("shutdown", 0), f"{stop}\n{console}"
    return parse(console)[0], dom


# ---------------------------------------------------------------------------
# exceptions through the guest's IDT
# ---------------------------------------------------------------------------

def exception_guest():
    """Fault on purpose, case by case; a handler per vector logs vector, error code,
    cr2 and the rip the CPU pushed, then resumes after the case."""
    g = ConformanceGuest("exceptions", events=True, xen_pv=False)
    a = g.a
    for vector in (0, 6, 13, 14):
        a.mov(edi, vector)
        a.lea(rsi, ptr[f"on_{vector}"])
        a.call("idt_set_gate")
    cases = []

    def case(name, *setup_and_fault, resume_after=True):
        cases.append(name)
        a.lea(rax, ptr[f"{name}.resume"])
        a.mov(qword["resume"], rax)
        for emit in setup_and_fault[:-1]:
            emit()
        a.label(f"{name}.at")
        setup_and_fault[-1]()
        a.label(f"{name}.resume")

    # #PF: write to a read-only page (the page-table pool is mapped read-only)
    g.start_info_field(rbx, "pt_base")
    case("pf_write_ro", lambda: a.mov(ecx, 7), lambda: a.mov(qword[rbx + 0x18], rcx))
    # #PF: read an unmapped address through base + index * 8 + displacement
    case("pf_read_sib", lambda: a.mov(rbx, UNMAPPED), lambda: a.mov(ecx, 2),
         lambda: a.mov(rdx, qword[rbx + rcx * 8 + 0x10]))
    # #PF: execute at an unmapped address
    case("pf_fetch", lambda: a.mov(rbx, UNMAPPED + 0x40), lambda: a.jmp(rbx))
    # #DE three times over: a CPU that remembered the first would call the third a #DF
    for i in range(3):
        case(f"de_{i}", lambda: a.xor(edx, edx), lambda: a.mov(eax, 1), lambda: a.xor(ecx, ecx),
             lambda: a.div(ecx))
    # #GP(0): a non-canonical address, twice; then #UD, after all those
    for i in range(2):
        case(f"gp_{i}", lambda: a.mov(rbx, NON_CANONICAL), lambda: a.mov(rcx, qword[rbx]))
    case("ud", lambda: a.ud2())

    a.jmp("handlers.end")
    for vector in (0, 6, 13, 14):
        a.label(f"on_{vector}")
        if vector not in (13, 14):
            a.push(0)                       # the same frame for all: error code at [rsp]
        a.push(rax)
        a.push(rcx)
        a.push(rdx)                         # [rsp+24] error, [rsp+32] rip
        a.mov(rcx, qword["log_count"])
        a.shl(rcx, 5)
        a.lea(rdx, ptr["log"])
        a.add(rdx, rcx)
        a.mov(qword[rdx], vector)
        a.mov(rax, qword[rsp + 24])
        a.mov(qword[rdx + 8], rax)
        a.mov(rax, cr2)
        a.mov(qword[rdx + 16], rax)
        a.mov(rax, qword[rsp + 32])
        a.mov(qword[rdx + 24], rax)
        a.inc(qword["log_count"])
        a.mov(rax, qword["resume"])
        a.mov(qword[rsp + 32], rax)         # carry on after the case
        a.pop(rdx)
        a.pop(rcx)
        a.pop(rax)
        a.add(rsp, 8)
        a.iretq()
    a.label("handlers.end")
    a.section(".data")
    a.align(8)
    a.label("resume")
    a.dq(0)
    a.label("log_count")
    a.dq(0)
    a.section(".bss")
    a.align(8)
    a.label("log")
    a.reserve(ENTRY * 32)
    a.section(".text")
    return g.finish(), cases


def test_exceptions_reach_the_idt_with_vector_error_cr2_and_rip(run_guest):
    image, cases = exception_guest()
    results, dom = run(run_guest, image)
    sym = load_image(image, 64 << 20).symbols
    count = int.from_bytes(dom.read_guest(sym["log_count"], 8), "little")
    raw = dom.read_guest(sym["log"], ENTRY * count)
    log = [tuple(int.from_bytes(raw[i + k:i + k + 8], "little") for k in range(0, 32, 8))
           for i in range(0, len(raw), ENTRY)]
    pt_base = dom.read_guest(dom.layout.virt(dom.layout.start_info) + offsetof("start_info", "pt_base"), 8)
    pt_base = int.from_bytes(pt_base, "little")
    expected = {                                    # vector, error code, cr2 (None: any), rip
        "pf_write_ro": (14, 0x3, pt_base + 0x18, sym["pf_write_ro.at"]),
        "pf_read_sib": (14, 0x0, UNMAPPED + 0x20, sym["pf_read_sib.at"]),
        "pf_fetch": (14, 0x10, UNMAPPED + 0x40, UNMAPPED + 0x40),
        "de_0": (0, 0, None, sym["de_0.at"]), "de_1": (0, 0, None, sym["de_1.at"]),
        "de_2": (0, 0, None, sym["de_2.at"]),
        "gp_0": (13, 0, None, sym["gp_0.at"]), "gp_1": (13, 0, None, sym["gp_1.at"]),
        "ud": (6, 0, None, sym["ud.at"]),
    }
    assert len(log) == len(cases)
    for name, (vector, error, cr2_value, rip_value) in zip(cases, log):
        want = expected[name]
        got = (vector, error, want[2] if want[2] is None else cr2_value, rip_value)
        assert got == want, f"{name}: got {tuple(map(hex, (vector, error, cr2_value, rip_value)))}"


def test_soft_interrupts_push_the_next_rip(run_guest, engine):
    g = ConformanceGuest("soft", events=True, xen_pv=False)
    a = g.a
    for vector in (3, 0x80):
        a.mov(edi, vector)
        a.lea(rsi, ptr[f"on_{vector}"])
        a.call("idt_set_gate")
    a.int3()
    a.label("after_int3")
    a.int_(0x80)
    a.label("after_int80")
    for vector, label in ((3, "after_int3"), (0x80, "after_int80")):
        a.lea(rbx, ptr[label])
        a.mov(rax, qword[f"seen_{vector}"])
        a.sub(rax, rbx)
        g.report(f"rip_offset_{vector}")        # 0: the pushed rip is the next instruction
    a.jmp("handlers.end")
    for vector in (3, 0x80):
        a.label(f"on_{vector}")
        a.mov(rax, qword[rsp])
        a.mov(qword[f"seen_{vector}"], rax)
        a.iretq()
    a.label("handlers.end")
    a.section(".data")
    a.align(8)
    for vector in (3, 0x80):
        a.label(f"seen_{vector}")
        a.dq(1)
    a.section(".text")
    stop, console, _ = run_guest(g.finish())
    # (on kvm: this host's KVM gives up on int3 and int n at CPL 0; cext/kvm_emul.c does them)
    assert (stop.kind, stop.reason) == ("shutdown", 0), f"{stop}\n{console}"
    assert parse(console)[0] == {"events_init": 0, "rip_offset_3": 0, "rip_offset_128": 0}


# ---------------------------------------------------------------------------
# interrupts: promptly, and as soon as the guest can take them
# ---------------------------------------------------------------------------

def tick_spinner(ticks: int):
    """Take `ticks` timer upcalls while spinning on a counter: no exit of its own."""
    g = ConformanceGuest("spinner", events=True, xen_pv=False)
    a = g.a
    a.mov(edi, C.VIRQ_TIMER)
    a.call("bind_virq")
    a.mov(r12, rax)
    set_port_handler(g, r12, "on_tick")
    a.mov(qword[rip + "ticks"], 0)
    a.mov(byte_ptr_mask(), 0)                   # upcalls on
    a.sti()
    g.call("periodic", "vcpu_op", C.VCPUOP_set_periodic_timer, 0,
           g.struct("period", "vcpu_set_periodic_timer", period_ns=1_000_000))
    a.label("spin")
    a.cmp(qword["ticks"], ticks)
    a.jb("spin")
    a.cli()
    g.hypercall("vcpu_op", C.VCPUOP_stop_periodic_timer, 0, 0)
    a.mov(rax, 1)
    g.report("spun")
    a.jmp("handler.end")
    a.label("on_tick")
    a.inc(qword["ticks"])
    a.ret()
    a.label("handler.end")
    a.section(".data")
    a.align(8)
    a.label("ticks")
    a.dq(0)
    a.section(".text")
    return g.finish()


def byte_ptr_mask():
    from guest_kernel.asm import byte
    return byte[rip + "shared_info" + UPCALL_MASK]


def test_a_guest_spinning_without_exits_still_gets_its_timer(run_guest, engine):
    # no console ring: the backend's "space free" notifications would be upcalls too
    results, dom = run(run_guest, tick_spinner(5), timeout=20, console_ring=False)
    assert results == {"events_init": 0, "periodic": 0, "spun": 1}     # 5 ticks handled
    # A tick that lands while the handler runs is taken by the same upcall (it loops
    # while evtchn_upcall_pending is set again): a loaded host sees fewer upcalls.
    upcalls = dom.counters().upcalls
    assert 1 <= upcalls <= 5
    if engine == "bt":
        assert dom.counters().exits["intr"] >= upcalls  # each upcall stopped the emulator


def window_guest():
    """With interrupts off, make an upcall pending; then turn them on with sti, popfq
    and iretq: the handler must have run by the next instruction but one."""
    g = ConformanceGuest("window", events=True, xen_pv=False)
    a = g.a
    g.call("bind_ipi", "event_channel_op", C.EVTCHNOP_bind_ipi,
           g.struct("bi", "evtchn_bind_ipi", vcpu=0))
    a.mov(ebx, dword[rip + "bi" + offsetof("evtchn_bind_ipi", "port")])   # the IPI's port
    set_port_handler(g, rbx, "on_ipi")
    a.mov(byte_ptr_mask(), 0)
    send = g.struct("send", "evtchn_send", port=0)
    a.mov(dword[rip + send], ebx)
    for how in ("sti", "popf", "iret"):
        a.cli()
        a.mov(qword["flag"], 0)
        g.hypercall("event_channel_op", C.EVTCHNOP_send, send)
        a.mov(rax, qword["flag"])
        g.report(f"{how}_before")
        if how == "sti":
            a.sti()
            a.nop()                                 # the sti shadow
        elif how == "popf":
            a.db(0x9C)                              # pushfq
            a.or_(qword[rsp], 0x200)
            a.db(0x9D)                              # popfq
        else:
            a.mov(rax, rsp)
            a.push(0x10)                            # ss
            a.push(rax)                             # rsp
            a.db(0x9C)                              # rflags, with IF
            a.or_(qword[rsp], 0x200)
            a.push(0x08)                            # cs
            a.lea(rax, ptr[f"{how}.back"])
            a.push(rax)
            a.iretq()
            a.label(f"{how}.back")
        a.mov(rax, qword["flag"])
        g.report(f"{how}_after")
    a.jmp("handler.end")
    a.label("on_ipi")
    a.mov(qword["flag"], 1)
    a.ret()
    a.label("handler.end")
    a.section(".data")
    a.align(8)
    a.label("flag")
    a.dq(0)
    a.section(".text")
    return g.finish()


def test_a_pending_upcall_arrives_when_sti_popf_or_iretq_turn_interrupts_on(run_guest, engine):
    results, dom = run(run_guest, window_guest())
    assert dom.counters().upcalls == 3
    late = {"sti_after": 0, "popf_after": 0, "iret_after": 0}
    if engine == "kvm" and late.items() <= results.items():
        # Seen on KVM-PVM hosts: no interrupt-window exit when the guest turns interrupts
        # on (at best a late one, under load), so the upcall waits for the guest's next
        # exit. Hardware (and bt) deliver it right away.
        pytest.xfail("this KVM host gives no timely interrupt-window exit")
    assert results == {"events_init": 0, "bind_ipi": 0,
                       "sti_before": 0, "sti_after": 1, "popf_before": 0, "popf_after": 1,
                       "iret_before": 0, "iret_after": 1}
    if engine == "bt":
        assert dom.counters().exits["irq_window"] == 3


def test_hlt_with_interrupts_off_is_a_guest_fault(run_guest, engine):
    g = ConformanceGuest("hlt", xen_pv=False)
    g.a.cli()
    g.a.label("the_hlt")
    g.a.hlt()
    image = g.finish()
    stop, _, _ = run_guest(image)
    assert stop.kind == "fault"
    assert stop.message == "hlt with interrupts disabled: nothing can wake the vCPU"


# ---------------------------------------------------------------------------
# what the translator counts
# ---------------------------------------------------------------------------

LOOPS = 10


def trap_guest(sensitive: bool):
    """A loop that, if `sensitive`, does 3 port writes and cli, sti, a cr3 reload and an
    invlpg per round; otherwise the same loop without them."""
    g = ConformanceGuest("traps", xen_pv=False)
    a = g.a
    a.mov(rbx, LOOPS)
    a.label("round")
    if sensitive:
        for _ in range(3):
            a.out(0x80, eax)
        a.cli()
        a.sti()
        a.mov(rax, cr3)
        a.mov(cr3, rax)
        a.invlpg(ptr["round"])
    a.dec(rbx)
    a.jne("round")
    a.cli()
    return g.finish()


def test_each_sensitive_instruction_is_one_trap_in_the_exit_counters(run_guest, engine):
    counts = {}
    for sensitive in (False, True):
        _, dom = run(run_guest, trap_guest(sensitive))
        counts[sensitive] = dom.counters().exits
    io = counts[True]["io"] - counts[False]["io"]
    priv = counts[True]["priv_insn"] - counts[False]["priv_insn"]
    assert io == 3 * LOOPS                          # port I/O exits on either engine
    # the translator's traps: cli, sti, mov to cr3, invlpg; hardware runs them in place
    assert priv == (4 * LOOPS if engine == "bt" else 0)


NATIVE_SIZES = {"console": 4096, "page_tables": 512, "clock": 200}


@needs_bt
@pytest.mark.skipif(engines.why_unavailable("kvm") is not None, reason="needs kvm to compare with")
@pytest.mark.parametrize("workload", NATIVE_SIZES)
def test_native_guest_traps_on_bt_exactly_where_it_exits_on_kvm(workload):
    from hypervisor.domain import Domain
    seen = {}
    for engine in ("kvm", "bt"):
        image = compare_workloads.build(workload, "native", NATIVE_SIZES[workload])
        with Domain(image, memory_mib=64, engine=engine, native=True) as dom:
            stop = dom.run(timeout=60)
            assert (stop.kind, stop.reason) == ("shutdown", 0), stop
            report = dom.read_guest(load_image(image, 64 << 20).symbols["report"],
                                    compare_workloads.REPORT_SIZE).split(b"\0")[0]
            exits = dom.counters().exits
            seen[engine] = (report, exits["io"], exits["mmio"], bytes(dom.console_output))
    assert seen["bt"] == seen["kvm"]


@needs_bt
def test_native_page_table_stores_trap_to_the_device_model_on_bt():
    from hypervisor.domain import Domain
    image = compare_workloads.build("page_tables", "native", 512)
    with Domain(image, memory_mib=64, engine="bt", native=True) as dom:
        stop = dom.run(timeout=60)
        assert (stop.kind, stop.reason) == ("shutdown", 0), stop
        stats = dom.device_stats()
        assert stats["pte_writes"] >= 512 and stats["pte_rejected"] == 0
        assert dom.counters().exits["mmio"] == stats["pte_writes"]


# ---------------------------------------------------------------------------
# choosing bt
# ---------------------------------------------------------------------------

def test_without_the_unicorn_library_bt_is_unavailable_in_one_line(tmp_path):
    fake = tmp_path / "unicorn"
    fake.mkdir()
    (fake / "__init__.py").write_text("")           # a unicorn package without libunicorn
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "TRAPLESS_NO_KVM": "1",
           "TRAPLESS_UNICORN": "stock"}     # not the patched build either
    r = subprocess.run([sys.executable, "-m", "hypervisor", "run", "--engine", "bt"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2
    assert r.stderr == ("trapless: engine bt: the unicorn package has no libunicorn "
                        "(pip install unicorn==2.1.4)\n")


def test_a_library_that_is_not_there_makes_bt_unavailable_in_one_line(tmp_path):
    env = {**os.environ, "TRAPLESS_NO_KVM": "1", "TRAPLESS_UNICORN": str(tmp_path / "no.so")}
    r = subprocess.run([sys.executable, "-m", "hypervisor", "run", "--engine", "bt"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert r.returncode == 2
    assert r.stderr.startswith("trapless: engine bt: cannot load the Unicorn library: ")
    assert r.stderr.count("\n") == 1 and "no.so" in r.stderr


# Xen PV guests whose bounces and irets bt does inside its hooks: what each leaves in
# guest memory (symbol, 8-byte words) and its exits, in a process of its own (the library
# is loaded once per process).
HOOK_PATH_PROBE = """
import json, struct, sys
from guest_kernel import workloads, xen_pv
from hypervisor.domain import Domain
from hypervisor.engines import bt_library_note
from hypervisor.image import load_image
out = {"note": bt_library_note()}
for name, image, symbol, words in (
        ("flags", xen_pv.trap_flags_guest(), "flags_results", 4),
        ("handlers", xen_pv.handler_hypercall_guest(rounds=3), "handler_results", 6),
        ("gs", xen_pv.user_mode_gs_guest(), "gs_results", 7),
        ("exception_loop", workloads.exception_bounce_loop(1000), None, 0),
        ("syscall_loop", workloads.syscall_bounce_loop(1000), None, 0)):
    with Domain(image, memory_mib=64, engine="bt") as dom:
        stop = dom.run(timeout=60)
        seen = []
        if symbol:
            at = load_image(image, 64 << 20).symbols[symbol]
            seen = list(struct.unpack(f"<{words}Q", dom.read_guest(at, 8 * words)))
        c = dom.counters()
        out[name] = [stop.kind, stop.reason, seen, c.total_exits, c.hypercalls.get("iret", 0)]
print(json.dumps(out))
"""


@needs_bt
def test_hook_bounces_are_the_same_with_the_patched_librarys_goto_and_without():
    """The PV bounces, irets and user syscalls bt does inside its hooks move rip with
    uc_reg_write_batch_goto on the patched library (uc-3-path.patch) and through Unicorn's
    register writes, which leave its cpu_exec, on the unicorn package's own: the same
    guests leave the same results and take the same exits on both."""
    import json
    from pathlib import Path
    patched = Path(engines.__file__).resolve().parent.parent / "build" / "unicorn" / "libunicorn.so.2"
    if not patched.exists():
        pytest.skip("the patched Unicorn is not built (make setup)")
    runs = {}
    for which in (str(patched), "stock"):
        env = {**os.environ, "TRAPLESS_NO_KVM": "1", "TRAPLESS_UNICORN": which}
        r = subprocess.run([sys.executable, "-c", HOOK_PATH_PROBE], capture_output=True,
                           text=True, env=env, timeout=300)
        assert r.returncode == 0, r.stderr
        runs[which] = json.loads(r.stdout)
    goto, stock = runs[str(patched)], runs["stock"]
    assert "uc_reg_write_batch_goto" in goto.pop("note")
    assert "uc_reg_write_batch_goto" not in stock.pop("note")
    assert goto == stock
    arith_df = [0x95 | 0x400, 0]                    # CF PF AF SF and DF, then none
    assert [f & (0x8D5 | 0x400) for f in goto["flags"][2]] == arith_df * 2
    assert goto["handlers"][2][2:] == [3, 3, 6, 0x5A5A_1234_5678]
    assert goto["gs"][2] == [0x5553_4552_0000_0002] * 4 + [0x4B45_524E_454C_0001] * 3
    for name in goto:
        assert goto[name][:2] == ["shutdown", 0], (name, goto[name])


@needs_bt
@pytest.mark.skipif(engines.why_unavailable("kvm") is not None, reason="needs kvm as well")
@pytest.mark.parametrize("sender_engine,receiver_engine", [("kvm", "bt"), ("bt", "kvm")])
def test_a_kvm_domain_and_a_bt_domain_share_an_event_channel(sender_engine, receiver_engine):
    import importlib.util
    from pathlib import Path
    from hypervisor.domain import Domain
    path = Path(__file__).parent / "conformance" / "test_interdomain.py"
    spec = importlib.util.spec_from_file_location("interdomain_guests", path)
    guests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(guests)
    a = Domain(guests.sender(peer=22), domid=21, engine=sender_engine, console_ring=False,
               xenstore=False)
    b = Domain(guests.receiver(peer=21), domid=22, engine=receiver_engine, console_ring=False,
               xenstore=False)
    try:
        b.start()
        a.start()
        stop_a, stop_b = a.wait(20), b.wait(20)
        assert (stop_a.kind, stop_b.kind) == ("shutdown", "shutdown"), (a.console_output, b.console_output)
        assert parse(b.console_output.decode())[0]["events_seen"] == 1
    finally:
        a.destroy()
        b.destroy()


def test_bench_puts_the_engines_side_by_side():
    from hypervisor.bench import side_by_side, side_by_side_table
    r = side_by_side(iterations=200, rounds=1, target_ms=20, compute_start=1000)
    assert r["engines"] == engines.available()
    for name in r["engines"]:
        assert r[name]["hypercall_ns"] > 0 and r[name]["compute_ns_per_round"] > 0
        assert r[name]["compute_rounds"] >= 1000
    if r["engines"] == ["kvm", "bt"]:
        assert r["compute_ratio_bt_over_kvm"] == round(
            r["bt"]["compute_ns_per_round"] / r["kvm"]["compute_ns_per_round"], 6)
        assert r["hypercall_ratio_bt_over_kvm"] == round(r["bt"]["hypercall_ns"] / r["kvm"]["hypercall_ns"], 6)
    assert side_by_side_table(r).row_count == 2
