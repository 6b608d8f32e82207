"""The toolstack: many domains in one hypervisor process, kept the way xl keeps them.

Each domain has its own engine instance (a KVM VM) and its own vCPU, run by the C
scheduler. When a vCPU stops, the toolstack's one reaper thread applies the domain's
on_poweroff / on_reboot / on_crash action (destroy, restart, preserve). Domains share
nothing but this table: one domain's crash or destruction leaves the others running.
Threads do not grow with domains: the scheduler's workers follow the vCPUs that run,
one hub thread reads every console (domain.py), one reaper applies every policy.

Locking: `_lock` guards the table and every call into a live Domain. A Domain is
taken out of its record under the lock before it is destroyed (outside the lock, as
destroying waits for its vCPU), so nobody reads a freed domain.
"""
from __future__ import annotations

import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field

from abi import C, CONSTANTS, ERRNO_NAMES

from . import engines
from .config import NAME_RE, DomainConfig
from .domain import Domain, StopInfo, TraceEntry
from .errors import ConfigError, TraplessError

# Xen's domid space ends below DOMID_FIRST_RESERVED; its last id is kept for the
# toolstack's own version probe, the rest (1 .. 0x7FEE) go to guests.
PROBE_DOMID = C.DOMID_FIRST_RESERVED - 1
MAX_DOMID = PROBE_DOMID - 1
CONSOLE_KEEP = 64 * 1024        # console bytes kept per domain for `console` to replay
QUICK_RUN_NS = 1_000_000_000    # a restart after less than this counts as quick ...
MAX_QUICK_RESTARTS = 3          # ... and after this many quick ones in a row we preserve


class ToolstackError(TraplessError):
    """A request the toolstack cannot do: an unknown domain, one that is gone, ..."""


# ---- decoding hypercalls for `trace` -------------------------------------------------

# hypercall -> (how many arguments it takes, the prefix naming its first argument)
HYPERCALL_ARGS = {
    "set_trap_table": (1, None), "mmu_update": (4, None), "set_timer_op": (1, None),
    "console_io": (3, "CONSOLEIO_"), "xen_version": (2, "XENVER_"),
    "sched_op": (2, "SCHEDOP_"), "event_channel_op": (2, "EVTCHNOP_"),
    "hvm_op": (2, "HVMOP_"), "vcpu_op": (3, "VCPUOP_"), "memory_op": (2, "XENMEM_"),
    "mmuext_op": (4, None), "multicall": (2, None), "grant_table_op": (3, "GNTTABOP_"),
}


def _names(prefix: str) -> dict[int, str]:
    names: dict[int, str] = {}
    for name, value in CONSTANTS.items():
        if name.startswith(prefix):
            names.setdefault(value, name)
    return names


SUBOP_NAMES = {prefix: _names(prefix) for _, prefix in HYPERCALL_ARGS.values() if prefix}


def _number(value: int) -> str:
    return str(value) if value < 4096 else f"{value:#x}"


def describe_call(e: TraceEntry) -> str:
    """`sched_op(SCHEDOP_block, 0)`: the call with its sub-op named."""
    arity, prefix = HYPERCALL_ARGS.get(e.name, (5, None))
    parts = []
    for i, value in enumerate(e.args[:arity]):
        if i == 0 and prefix:
            cmd, start = value, 0
            if e.name == "memory_op":    # the bits above the sub-op say where to continue
                cmd, start = value & C.XENMEMOP_CMD_MASK, value >> 6
            text = SUBOP_NAMES[prefix].get(cmd, str(cmd))
            parts.append(text + (f"@{start}" if start else ""))
        else:
            parts.append(_number(value))
    return f"{e.name}({', '.join(parts)})"


def describe_result(ret: int) -> str:
    """0, 42, or -EINVAL."""
    if ret < 0 and -ret in ERRNO_NAMES:
        return f"-{ERRNO_NAMES[-ret]}"
    return str(ret)


# ---- what a stop means ---------------------------------------------------------------

def _is_crash(stop: StopInfo) -> bool:
    return stop.kind in ("fault", "error") or (
        stop.kind == "shutdown" and stop.reason in (C.SHUTDOWN_crash, C.SHUTDOWN_watchdog))


def describe_stop(stop: StopInfo) -> str:
    if stop.kind == "shutdown":
        return f"shut down ({stop.shutdown_name})"
    if stop.kind == "fault":
        return f"crashed: {stop.message} at rip={stop.rip:#x}"
    if stop.kind == "error":
        return f"crashed: engine error: {stop.message}"
    return "stopped"


def _policy_key(stop: StopInfo) -> str | None:
    """Which config key decides what happens next (None: the domain is kept)."""
    if stop.kind in ("fault", "error"):
        return "on_crash"
    if stop.kind != "shutdown":
        return None
    return {C.SHUTDOWN_poweroff: "on_poweroff", C.SHUTDOWN_reboot: "on_reboot",
            C.SHUTDOWN_crash: "on_crash", C.SHUTDOWN_watchdog: "on_crash"}.get(stop.reason)


# ---- records, rows, samples ----------------------------------------------------------

class DomainRecord:
    """A configured domain: its config and name, and the Domain now running it (a restart
    replaces the Domain and the domid; the record, its name and its console stay)."""

    def __init__(self, config: DomainConfig, name: str, domid: int, engine: str):
        self.config, self.name, self.domid, self.engine = config, name, domid, engine
        self.domain: Domain | None = None
        self.phase = "building"          # the state shown while there is no Domain
        self.stop: StopInfo | None = None  # set when the stopped domain is preserved
        self.gone = False                  # destroyed: the record is out of the table
        self.started_ns = 0
        self.quick_restarts = 0
        self.restarts = 0
        self._console = bytearray()
        self._console_lock = threading.Lock()
        self._subscribers: list = []

    def __repr__(self) -> str:
        return f"<domain {self.domid} {self.name}>"

    # Console output of every Domain this record runs lands here (the Domain's reader
    # thread calls it); subscribers get it in order, with nothing lost or repeated.
    def _on_console(self, chunk: bytes) -> None:
        with self._console_lock:
            self._console += chunk
            if len(self._console) > CONSOLE_KEEP:
                del self._console[:len(self._console) - CONSOLE_KEEP]
            for listen in self._subscribers:
                listen(chunk)

    def subscribe(self, listen) -> bytes:
        """Register listen(chunk) for new output; returns what was kept before it."""
        with self._console_lock:
            self._subscribers.append(listen)
            return bytes(self._console)

    def unsubscribe(self, listen) -> None:
        with self._console_lock:
            if listen in self._subscribers:
                self._subscribers.remove(listen)

    @property
    def console_text(self) -> str:
        with self._console_lock:
            return self._console.decode(errors="replace")


@dataclass
class DomainRow:
    """One line of `list`."""
    domid: int
    name: str
    state: str
    memory_mib: int
    cpu_ns: int
    engine: str
    vcpus: int              # the vCPUs the domain has (maxvcpus, else vcpus)


@dataclass
class DomainSample:
    """Cumulative counters of one domain at one moment (for `top`)."""
    domid: int
    name: str
    state: str
    memory_mib: int
    engine: str
    time_ns: int
    cpu_ns: int = 0
    exits: int = 0
    hypercalls: dict[str, int] = field(default_factory=dict)
    pending: int = 0


@dataclass
class DomainRates:
    """One line of `top`: rates between two samples."""
    domid: int
    name: str
    state: str
    memory_mib: int
    engine: str
    cpu_pct: float
    exits_per_s: float
    hypercalls_per_s: dict[str, float]
    pending: int

    @property
    def total_hypercalls_per_s(self) -> float:
        return sum(self.hypercalls_per_s.values())


def rates(before: list[DomainSample], after: list[DomainSample]) -> list[DomainRates]:
    """Per-domain rates between two samples (zero for a domain new in `after`)."""
    old = {s.domid: s for s in before}
    out = []
    for s in after:
        b = old.get(s.domid)
        if b is None or b.name != s.name:
            b = s                       # nothing to compare with yet
        dt = (s.time_ns - b.time_ns) / 1e9
        per_s = lambda now, then: (now - then) / dt if dt > 0 else 0.0
        calls = {name: per_s(n, b.hypercalls.get(name, 0)) for name, n in s.hypercalls.items()}
        out.append(DomainRates(s.domid, s.name, s.state, s.memory_mib, s.engine,
                               cpu_pct=100.0 * max(per_s(s.cpu_ns, b.cpu_ns), 0.0) / 1e9,
                               exits_per_s=per_s(s.exits, b.exits),
                               hypercalls_per_s={k: v for k, v in calls.items() if v > 0},
                               pending=s.pending))
    return out


# ---- the toolstack -------------------------------------------------------------------

class Toolstack:
    """The table of domains and everything done to them."""

    def __init__(self):
        self._lock = threading.Lock()
        self._records: dict[int, DomainRecord] = {}
        self._next_domid = 1
        self._stopped: queue.SimpleQueue = queue.SimpleQueue()     # (record, Domain) | None
        self._reaper = threading.Thread(target=self._reap_stopped, name="trapless-reaper",
                                        daemon=True)
        self._reaper.start()
        self._closed = False
        self._t0 = time.monotonic()
        self._log: list[str] = []
        self._log_lock = threading.Lock()
        self._version: str | None = None
        self.log(f"toolstack started (pid {os.getpid()}); engines available: "
                 f"{', '.join(engines.available()) or 'none'}")
        self.fallback_note = engines.fallback_note()
        if self.fallback_note:
            self.log(self.fallback_note)

    # ---- the log (`dmesg`) ----
    def log(self, message: str) -> None:
        with self._log_lock:
            self._log.append(f"[{time.monotonic() - self._t0:10.6f}] {message}")

    def dmesg(self) -> list[str]:
        with self._log_lock:
            return list(self._log)

    # ---- finding domains ----
    def find(self, ref: str | int) -> DomainRecord:
        """A domain by id or name."""
        with self._lock:
            for rec in self._records.values():
                if str(rec.domid) == str(ref) or rec.name == ref:
                    return rec
        raise ToolstackError(f"no domain {ref!r} (see list)")

    def records(self) -> list[DomainRecord]:
        with self._lock:
            return sorted(self._records.values(), key=lambda r: r.domid)

    def names(self) -> list[str]:
        return [r.name for r in self.records()]

    # ---- creating ----
    def create(self, config: DomainConfig) -> DomainRecord:
        """Build the domain and start its vCPU; returns once it runs."""
        engine = engines.choose(config.engine)
        with self._lock:
            if self._closed:
                raise ToolstackError("the toolstack is shutting down")
            name = self._pick_name(config)
            rec = DomainRecord(config, name, self._alloc_domid(), engine)
            self._records[rec.domid] = rec        # holds the id and name while building
        try:
            dom = self._build(rec)
        except BaseException:
            with self._lock:
                self._records.pop(rec.domid, None)
                if self._next_domid == rec.domid % MAX_DOMID + 1:
                    self._next_domid = rec.domid       # a failed create uses up no id
            raise
        with self._lock:
            if not rec.gone:
                self._launch(rec, dom)
                dom = None
        if dom is not None:                       # destroyed while it was being built
            self._destroy_domain(dom)
            raise ToolstackError(f"domain {name} was destroyed while it was being built")
        self.log(f"domain {rec.domid} ({name}) created: {config.kernel}, {config.memory} MiB, "
                 f"engine {rec.engine}, cmdline {config.full_cmdline!r}")
        return rec

    def _pick_name(self, config: DomainConfig) -> str:
        taken = {r.name for r in self._records.values()}
        if config.name:
            if config.name in taken:
                raise ToolstackError(f"name {config.name!r}: a domain with that name exists")
            return config.name
        stem = re.sub(r"[^A-Za-z0-9_.-]", "-", config.kernel.stem) if config.kernel else "domain"
        if not NAME_RE.fullmatch(stem):
            stem = "d-" + stem
        name, n = stem, 1
        while name in taken:
            n += 1
            name = f"{stem}-{n}"
        return name

    def _alloc_domid(self) -> int:
        for _ in range(MAX_DOMID):
            domid = self._next_domid
            self._next_domid = domid % MAX_DOMID + 1
            if domid not in self._records:
                return domid
        raise ToolstackError(f"no free domain id: {MAX_DOMID} domains exist")

    def _build(self, rec: DomainRecord) -> Domain:
        cfg = rec.config
        ramdisk = None
        if cfg.ramdisk is not None:
            try:
                ramdisk = cfg.ramdisk.read_bytes()
            except OSError as e:
                raise ConfigError(f"ramdisk {cfg.ramdisk}: cannot read ({e.strerror})") from None
        # the Domain writes its keys into xenstore and removes them when destroyed
        dom = Domain(str(cfg.kernel), memory_mib=cfg.memory, maxmem_mib=cfg.maxmem,
                     cmdline=cfg.full_cmdline,
                     # the config's engine, or the best one for this guest (a PVH
                     # guest may need bt where kvm cannot take its vmcall: pvh.py)
                     engine=cfg.engine,
                     domid=rec.domid, name=rec.name,
                     on_console=rec._on_console,
                     on_stop=lambda dom, rec=rec: self._stopped.put((rec, dom)),
                     guest_type=cfg.type, ramdisk=ramdisk, disks=cfg.disk,
                     vifs=cfg.vif, vcpus=cfg.vcpu_count, vcpus_online=cfg.vcpus)
        rec.engine = dom.engine
        return dom

    @staticmethod
    def _destroy_domain(dom: Domain) -> None:
        dom.destroy()

    def _launch(self, rec: DomainRecord, dom: Domain) -> None:
        """Caller holds _lock."""
        rec.domain, rec.stop, rec.started_ns = dom, None, time.monotonic_ns()
        dom.start()

    # ---- lifecycle: what happens when a vCPU stops ----
    def _reap_stopped(self) -> None:
        """The reaper: every stopped vCPU of every domain, one at a time."""
        while True:
            item = self._stopped.get()
            if item is None:
                return
            try:
                self._watch(*item)
            except Exception as e:              # one domain's trouble must not stop it
                self.log(f"domain {item[0].name}: applying its stop policy failed: {e!r}")

    def _watch(self, rec: DomainRecord, dom: Domain) -> None:
        with self._lock:
            if rec.domain is not dom or rec.gone:
                return                  # destroyed on purpose: nothing to decide
            stop = dom.stop_info
            key = _policy_key(stop)
            action = getattr(rec.config, key) if key else "preserve"
            note = ""
            if action == "restart":
                quick = time.monotonic_ns() - rec.started_ns < QUICK_RUN_NS
                rec.quick_restarts = rec.quick_restarts + 1 if quick else 0
                if rec.quick_restarts > MAX_QUICK_RESTARTS:
                    action, note = "preserve", (f" (it stopped within a second "
                                                f"{MAX_QUICK_RESTARTS + 1} times in a row)")
            self.log(f"domain {rec.domid} ({rec.name}) {describe_stop(stop)}; "
                     f"{key or 'kept'} = {action}{note}")
            if action == "preserve":
                rec.stop = stop         # kept: list, trace and counters still work
                return
            rec.domain = None
            del self._records[rec.domid]
            if action == "destroy":
                rec.gone = True
            else:
                rec.phase, rec.restarts = "restarting", rec.restarts + 1
                rec.domid = self._alloc_domid()
                self._records[rec.domid] = rec
        self._destroy_domain(dom)
        if action == "restart":
            self._restart(rec)

    def _restart(self, rec: DomainRecord) -> None:
        try:
            dom = self._build(rec)
        except TraplessError as e:
            with self._lock:
                self._records.pop(rec.domid, None)
                rec.gone = True
            self.log(f"domain {rec.name}: restart failed: {e}")
            return
        with self._lock:
            if not rec.gone:
                self._launch(rec, dom)
                self.log(f"domain {rec.name} restarted as domain {rec.domid}")
                return
        self._destroy_domain(dom)

    # ---- what a person does to a domain ----
    def _live(self, rec: DomainRecord, what: str) -> Domain:
        """Caller holds _lock. The running Domain of rec, or a one-line refusal."""
        if rec.gone:
            raise ToolstackError(f"domain {rec.name} is gone")
        if rec.domain is None:
            raise ToolstackError(f"cannot {what} domain {rec.name}: it is {rec.phase}")
        if rec.stop is not None or rec.domain.stop_info is not None:
            raise ToolstackError(f"cannot {what} domain {rec.name}: it is {self._state(rec)}")
        return rec.domain

    def pause(self, rec: DomainRecord) -> None:
        with self._lock:
            self._live(rec, "pause").pause()
        self.log(f"domain {rec.domid} ({rec.name}) paused")

    def unpause(self, rec: DomainRecord) -> None:
        with self._lock:
            self._live(rec, "unpause").unpause()
        self.log(f"domain {rec.domid} ({rec.name}) unpaused")

    def send_input(self, rec: DomainRecord, data: bytes) -> int:
        """Queue keyboard input for the domain's CONSOLEIO_read; how many bytes fit."""
        with self._lock:
            return self._live(rec, "send input to").send_input(data)

    def destroy(self, rec: DomainRecord) -> None:
        with self._lock:
            if rec.gone:
                raise ToolstackError(f"domain {rec.name} is gone")
            rec.gone = True
            self._records.pop(rec.domid, None)
            dom, rec.domain = rec.domain, None
        if dom is not None:
            self._destroy_domain(dom)
        self.log(f"domain {rec.domid} ({rec.name}) destroyed")

    def shutdown(self) -> None:
        """Destroy every domain and wait for every thread the toolstack started."""
        with self._lock:
            self._closed = True
            recs = list(self._records.values())
            self._records.clear()
            doms = []
            for rec in recs:
                rec.gone = True
                if rec.domain is not None:
                    doms.append(rec.domain)
                rec.domain = None
        for dom in doms:
            self._destroy_domain(dom)
        self._stopped.put(None)
        if self._reaper is not threading.current_thread():
            self._reaper.join()
        if recs:
            self.log(f"shut down: destroyed {len(recs)} domain(s)")

    # ---- looking at domains ----
    def _state(self, rec: DomainRecord) -> str:
        """Caller holds _lock."""
        if rec.domain is None:
            return "gone" if rec.gone else rec.phase
        stop = rec.stop or rec.domain.stop_info
        if stop is not None:
            return "crashed" if _is_crash(stop) else "shutdown"
        state = rec.domain.vcpu_state
        return "running" if state == "stopped" else state   # stopped: not yet entered

    def state(self, rec: DomainRecord) -> str:
        with self._lock:
            return self._state(rec)

    def list(self) -> list[DomainRow]:
        with self._lock:
            return [DomainRow(r.domid, r.name, self._state(r), r.config.memory,
                              r.domain.cpu_ns if r.domain else 0, r.engine,
                              r.config.vcpu_count)
                    for r in sorted(self._records.values(), key=lambda r: r.domid)]

    def sample(self) -> list[DomainSample]:
        with self._lock:
            out = []
            for r in sorted(self._records.values(), key=lambda r: r.domid):
                s = DomainSample(r.domid, r.name, self._state(r), r.config.memory, r.engine,
                                 time.monotonic_ns())
                if r.domain is not None:
                    c = r.domain.counters()
                    s.cpu_ns, s.exits, s.hypercalls = r.domain.cpu_ns, c.total_exits, c.hypercalls
                    s.pending = r.domain.pending_events
                out.append(s)
            return out

    def trace(self, rec: DomainRecord, last: int) -> list[TraceEntry]:
        with self._lock:
            if rec.domain is None:
                raise ToolstackError(f"domain {rec.name} is {self._state(rec)}: no trace")
            return rec.domain.trace(last)

    def hypervisor_version(self) -> str:
        """The Xen version the hypervisor reports, asked the way a guest asks it: a tiny
        probe domain calls xen_version and prints the answer (once; then cached)."""
        if self._version is None:
            from guest_kernel.asm import rax
            from guest_kernel.pv_kernel import emit_print_xen_version
            from guest_kernel.runtime import PVProgram

            p = PVProgram(guest_os="trapless-version-probe")
            emit_print_xen_version(p)
            p.a.mov(rax, C.SHUTDOWN_poweroff)
            p.a.ret()
            with Domain(p.elf(), memory_mib=8, domid=PROBE_DOMID, name="version-probe") as dom:
                stop = dom.run(timeout=10)
                if stop.kind != "shutdown":
                    raise ToolstackError(f"version probe: {describe_stop(stop)}")
                self._version = dom.console_output.decode()
        return self._version
