"""A running domain: guest memory and counters in C, a vCPU the C scheduler runs, a
console stream.

Once started, the vCPU is run by C worker threads (vcpu.c) with no GIL; a blocked vCPU
holds no thread. Console output arrives on a pipe the C console service writes to; one
thread for the whole process (the console hub) reads every domain's pipe, keeps the
last CONSOLE_KEEP bytes of each and hands new output to whoever listens (stdout for
`run`, the toolstack's console). The pipe ends when the vCPU stops for good: that end of
file is how a Domain learns that its guest stopped.
"""
from __future__ import annotations

import os
import selectors
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from abi import HYPERCALL_NAMES, SHUTDOWN_NAMES

from . import builder, engines, pvh
from ._hv import ffi, lib
from .errors import ConfigError, DomainError, EngineError, ImageError
from .image import PVImage, load_image

# Guest RAM and its grant region (cext/grant_table.h, after the RAM) end below
# 0xF0000000, where the PV hypervisor region starts; KVM on Intel also wants a few pages
# under 4 GiB (KVM_SET_TSS_ADDR) that no memslot may cover. The region's frames, rounded
# up to whole MiB, come off 3840 MiB.
MIN_MEMORY_MIB = 4
MAX_MEMORY_MIB = 3840 - ((lib.HV_GNT_REGION_FRAMES * 4096 + (1 << 20) - 1) >> 20)
# vCPUs a domain may have: each keeps its vcpu_info in shared_info (Xen's legacy slots),
# so a guest needs no VCPUOP_register_vcpu_info before it brings one up (cext/hv.h).
MAX_VCPUS = lib.XEN_LEGACY_MAX_VCPUS
CONSOLE_KEEP = 64 * 1024        # console bytes a Domain keeps (the latest); older ones go
BUDGET_MARGIN_MIB = 1024        # the default memory budget leaves the host this much


def check_vcpus(n: int) -> int:
    if not 1 <= n <= MAX_VCPUS:
        raise DomainError(f"{n} vCPUs: must be between 1 and {MAX_VCPUS}")
    return n


def _available_mib() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) // 1024
    except OSError:
        pass
    return None


def set_memory_budget(mib: int | None) -> None:
    """The host-wide budget for guest memory: the maxmem of all live domains together may
    not exceed it (a domain that would is refused). None: no budget."""
    lib.hv_set_memory_budget(0 if mib is None else max(int(mib), 0) << 20)


def memory_budget_mib() -> int | None:
    budget = lib.hv_memory_budget()
    return budget >> 20 if budget else None


def _default_budget() -> int | None:
    """TRAPLESS_MEMORY_BUDGET_MIB (0: none), else the host's available memory less a
    margin, as the process starts."""
    configured = os.environ.get("TRAPLESS_MEMORY_BUDGET_MIB")
    if configured is not None:
        try:
            mib = int(configured)
        except ValueError:
            raise ConfigError(f"TRAPLESS_MEMORY_BUDGET_MIB={configured!r}: not a whole "
                              f"number of MiB") from None
        return mib if mib > 0 else None
    available = _available_mib()
    return None if available is None else max(available - BUDGET_MARGIN_MIB, MIN_MEMORY_MIB)


def _raise_fd_limit() -> None:
    """Each domain holds a few descriptors (its console pipe, KVM's VM and vCPU): take
    the hard limit, so a thousand domains fit."""
    try:
        import resource
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard if hard != resource.RLIM_INFINITY
                                                        else max(soft, 65536), hard))
    except (ImportError, ValueError, OSError):
        pass

EXIT_REASON_NAMES = {
    getattr(lib, n): n[len("HV_EXIT_"):].lower()
    for n in dir(lib) if n.startswith("HV_EXIT_") and n != "HV_EXIT_NR"
}


VCPU_STATES = {lib.HV_VCPU_STOPPED: "stopped", lib.HV_VCPU_RUNNING: "running",
               lib.HV_VCPU_BLOCKED: "blocked", lib.HV_VCPU_PAUSED: "paused"}


@dataclass
class TraceEntry:
    """One traced hypercall."""
    seq: int
    time_ns: int
    nr: int
    args: tuple[int, ...]
    ret: int

    @property
    def name(self) -> str:
        return HYPERCALL_NAMES.get(self.nr, f"hypercall_{self.nr}")


@dataclass
class StopInfo:
    """Why a domain stopped, in words a user can act on."""
    kind: str                   # "shutdown", "fault", "stopped", "error"
    reason: int = 0             # Xen shutdown reason for "shutdown"
    rip: int = 0
    message: str = ""
    elapsed_ns: int = 0

    @property
    def shutdown_name(self) -> str:
        return SHUTDOWN_NAMES.get(self.reason, f"reason {self.reason}")


@dataclass
class Counters:
    exits: dict[str, int]
    hypercalls: dict[str, int]
    hypercall_errors: dict[str, int]
    unknown_port_io: int
    upcalls: int = 0                # callback vectors injected
    blocks: int = 0                 # sleeps in SCHEDOP_block / poll / hlt
    twin_entries: int = 0           # kvm: times compat-mode code moved to the Unicorn twin
    total_exits: int = field(init=False)

    def __post_init__(self):
        self.total_exits = sum(self.exits.values())


class _ConsoleHub:
    """One thread that reads every domain's console pipe (epoll): new output goes to the
    domain, end of file tells it that its vCPU stopped for good."""

    def __init__(self):
        self._selector = selectors.DefaultSelector()
        self._lock = threading.Lock()
        self._added: list[tuple[int, "Domain"]] = []
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._thread: threading.Thread | None = None

    def add(self, fd: int, domain: "Domain") -> None:
        with self._lock:
            self._added.append((fd, domain))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="trapless-console",
                                                daemon=True)
                self._thread.start()
        os.write(self._wake_w, b"+")

    def _run(self) -> None:
        while True:
            for key, _ in self._selector.select():
                if key.data is None:
                    try:
                        os.read(self._wake_r, 4096)
                    except BlockingIOError:
                        pass
                    with self._lock:
                        added, self._added = self._added, []
                    for fd, domain in added:
                        self._selector.register(fd, selectors.EVENT_READ, domain)
                    continue
                try:
                    chunk = os.read(key.fd, 65536)
                except OSError:
                    chunk = b""
                if chunk:
                    key.data._console_arrived(chunk)
                else:
                    self._selector.unregister(key.fd)
                    key.data._console_ended()


_hub = _ConsoleHub()
_raise_fd_limit()
try:
    set_memory_budget(_default_budget())
except ConfigError:
    pass                        # reported when a domain is created (Domain.__init__)


class Domain:
    """One guest: build it, start its vCPU, wait for it, read its counters.

    A Domain is used once: start() once, then wait() or run(); destroy() frees it, after
    which every method raises DomainError."""

    def __init__(self, image: PVImage | str | Path | bytes, *, memory_mib: int = 64,
                 cmdline: str = "", engine: str | None = None, domid: int = 1,
                 name: str = "", on_console: Callable[[bytes], None] | None = None,
                 max_evtchn_ports: int = 0, native: bool = False,
                 maxmem_mib: int | None = None, console_keep: int = CONSOLE_KEEP,
                 on_stop: Callable[["Domain"], None] | None = None, console_ring: bool = True,
                 xenstore: bool = True, guest_type: str | None = None,
                 ramdisk: bytes | None = None, disks: list | None = None,
                 vifs: list | None = None, vcpus: int = 1,
                 vcpus_online: int | None = None):
        """memory_mib is what the domain starts with; maxmem_mib (default: the same) is
        how far it may balloon up: its guest-physical space and maximum reservation.
        console_keep: how many of the latest console bytes console_output keeps.
        on_console(chunk) gets the output as it comes; on_stop(domain) is called once the
        vCPU stopped for good (both from the console hub's thread: keep them short).
        console_ring: give the domain a PV console ring and its event channel, as Xen's
        builder gives every domU; xenstore: give it a ring on the store (cext/xenstore.c).
        As with Xen's toolstack, the store's port is the domain's first, the console's next.
        guest_type: "pv" or "pvh" (None: as the image's notes say, image.py); ramdisk:
        an initramfs (a PVH guest's module 0, a PV guest's start_info.mod_start);
        disks: config.Disk entries, each a virtual block device whose xenstore
        directories are written with the domain's keys (needs xenstore); vifs:
        config.Vif entries, each a virtual network card plugged into its software
        bridge (cext/netback.c), found the same way.
        vcpus: how many vCPUs the domain has (xl's maxvcpus=, else vcpus=): vCPU 0 runs
        the image, the others wait, down, for the guest's VCPUOP_initialise
        (cext/vcpu_op.c); vcpus_online (xl's vcpus=, default all): how many xenstore
        calls available (cpu/<n>/availability), which the guest reads to bring them up."""
        self._dom = None
        self._lock = threading.RLock()
        self._state = "building"
        self._started = False
        self._introduced = False            # its keys are in xenstore
        self._eof = threading.Event()
        _default_budget()                   # a bad TRAPLESS_MEMORY_BUDGET_MIB: one line
        maxmem_mib = memory_mib if maxmem_mib is None else maxmem_mib
        for what, mib in (("memory", memory_mib), ("maxmem", maxmem_mib)):
            if not MIN_MEMORY_MIB <= mib <= MAX_MEMORY_MIB:
                raise ImageError(f"{what} {mib} MiB: must be between {MIN_MEMORY_MIB} and "
                                 f"{MAX_MEMORY_MIB} MiB")
        if maxmem_mib < memory_mib:
            raise ImageError(f"maxmem {maxmem_mib} MiB is below memory {memory_mib} MiB")
        if console_keep < 0:
            raise DomainError(f"console_keep {console_keep}: must be 0 or more bytes")
        check_vcpus(vcpus)
        if vcpus_online is not None and not 1 <= vcpus_online <= vcpus:
            raise DomainError(f"{vcpus_online} vCPUs online: must be between 1 and {vcpus}")
        start_bytes, ram_bytes = memory_mib << 20, maxmem_mib << 20
        # The image and the start-of-day region live in the memory the domain starts with.
        self.image = image if isinstance(image, PVImage) else load_image(
            image, start_bytes, guest_type=guest_type)
        self.guest_type = self.image.guest_type
        self.engine_note = None         # why a PVH guest does not run on kvm here
        # PV: Xen's PV CPU model unless the image asks for a ring-0 kernel
        # (builder.cpu_model); a native guest is no PV guest at all and keeps ring 0, and
        # a PVH guest runs its kernel in ring 0 of its HVM container.
        self.pv_model = (builder.RING0 if native or self.guest_type == "pvh"
                         else builder.cpu_model(self.image))
        if self.guest_type == "pvh":
            self.engine, self.engine_note = pvh.choose_engine(engine, self.image)
            self.layout = pvh.plan(self.image, start_bytes, len(ramdisk or b""))
        else:
            self.engine = engines.choose(engine)
            self.layout = builder.plan(self.image, start_bytes, self.pv_model,
                                       len(ramdisk or b""))
        self.domid, self.name, self.cmdline = domid, name or f"d{domid}", cmdline
        self.disks = list(disks or ())
        if self.disks and not xenstore:
            raise DomainError("a disk is found through xenstore: this domain has none")
        self.vifs = list(vifs or ())
        if self.vifs and not xenstore:
            raise DomainError("a network card is found through xenstore: this domain has none")
        self.uuid = uuid.uuid4()
        self._output = bytearray()
        self._console_keep = console_keep
        self._listeners = [on_console] if on_console else []
        self._on_stop = on_stop
        self._stop: StopInfo | None = None

        self._console_r, console_w = os.pipe()
        cfg = ffi.new("struct hv_domain_config *")
        cfg.engine = engines.ENGINES[self.engine]
        cfg.domid = domid
        cfg.ram_bytes = ram_bytes
        # A read-only pool of page-table frames keeps trapless's ring-0 kernels from
        # writing their tables. Under Xen's model the frame types do that, and the
        # bootstrap tables are ordinary frames: Linux unpins them and maps them
        # writable for reuse, which a pool frame could never be.
        if self.pv_model == builder.XEN_PV:
            cfg.pt_pool_start = cfg.pt_pool_end = 0
        else:
            cfg.pt_pool_start = self.layout.pt_start
            cfg.pt_pool_end = self.layout.pt_end
        cfg.console_fd = console_w
        cfg.handle = self.uuid.bytes
        cfg.max_evtchn_ports = max_evtchn_ports
        cfg.pv_model = self.pv_model
        cfg.guest_type = lib.HV_GUEST_PVH if self.guest_type == "pvh" else lib.HV_GUEST_PV
        cfg.max_vcpus = vcpus
        self.vcpus = vcpus
        err = ffi.new("char[256]")
        self._dom = lib.hv_domain_create(cfg, err, len(err))
        if self._dom == ffi.NULL:
            self._dom = None
            os.close(console_w)
            os.close(self._console_r)
            self._state = "destroyed"
            raise EngineError(f"cannot create domain: {ffi.string(err).decode()}")
        # From here the C domain owns console_w and closes it; the hub reads the rest.
        _hub.add(self._console_r, self)
        try:
            for vcpu_id in range(vcpus):     # vCPU 0 first: the builder starts it
                vcpu = lib.hv_vcpu_create(self._dom, vcpu_id, err, len(err))
                if vcpu == ffi.NULL:
                    raise EngineError(f"cannot create vCPU {vcpu_id}: "
                                      f"{ffi.string(err).decode()}")
                if vcpu_id == 0:
                    self._vcpu = vcpu
            # native: the emulated PC devices an unmodified kernel drives (cext/devices.c).
            self.native = native
            if native and lib.hv_domain_add_devices(self._dom, err, len(err)) < 0:
                raise EngineError(f"cannot add devices: {ffi.string(err).decode()}")
            ram = ffi.buffer(lib.hv_domain_ram(self._dom), ram_bytes)
            self.console_evtchn = self.store_evtchn = 0
            # the store's port before the console's, as libxl allocates them
            if xenstore:
                port = lib.hv_xs_attach(self._dom, self.layout.xenstore)
                if port < 0:
                    raise EngineError(f"cannot attach the xenstore ring: Xen errno {-port}")
                self.store_evtchn = port
            if console_ring:
                port = lib.hv_console_ring_attach(self._dom, self.layout.console)
                if port < 0:
                    raise EngineError(f"cannot attach the console ring: Xen errno {-port}")
                self.console_evtchn = port
            if self.guest_type == "pvh":
                boot = pvh.build(memoryview(ram), self.image, self.layout, cmdline, ramdisk)
                if self.store_evtchn:
                    pvh.set_store_params(self._dom, self.layout.xenstore, self.store_evtchn)
                if self.console_evtchn:
                    pvh.set_console_params(self._dom, self.layout.console, self.console_evtchn)
            else:
                boot = builder.build(memoryview(ram), self.image, self.layout, cmdline,
                                     self.pv_model, console_evtchn=self.console_evtchn,
                                     store_evtchn=self.store_evtchn, ramdisk=ramdisk)
            if lib.hv_mm_init(self._dom, boot.cr3, err, len(err)) < 0 or (
                    ram_bytes > start_bytes and
                    lib.hv_mm_set_reservation(self._dom, start_bytes >> 12, err, len(err)) < 0) or (
                    getattr(self.layout, "shared_info", None) is not None and
                    lib.hv_domain_place_shared_info(self._dom, self.layout.shared_info >> 12) < 0):
                raise EngineError(f"cannot set up the domain's memory: "
                                  f"{ffi.string(err).decode()}")
            bs = ffi.new("struct hv_boot_state *", vars(boot))
            if lib.hv_vcpu_set_boot_state(self._vcpu, bs, err, len(err)) < 0:
                raise EngineError(f"cannot set the vCPU's boot state: "
                                  f"{ffi.string(err).decode()}")
            if xenstore:                # its keys are there before its first instruction
                from . import xenstore as store
                store.introduce(domid, self.name, str(self.uuid), memory_mib * 1024,
                                maxmem_mib * 1024,
                                (self.layout.xenstore >> 12, self.store_evtchn)
                                if self.store_evtchn else None,
                                (self.layout.console >> 12, self.console_evtchn)
                                if console_ring else None, vcpus, vcpus_online)
                self._introduced = True
                for disk in self.disks:
                    store.add_vbd(domid, disk.devid, disk.vdev, str(disk.target),
                                  disk.readonly)
                    self._attach_disk(disk, err)
                for vif in self.vifs:
                    store.add_vif(domid, vif.devid, vif.mac, vif.bridge)
                    if lib.hv_netback_attach(self._dom, vif.devid, vif.mac_bytes,
                                             vif.bridge.encode(), err, len(err)) < 0:
                        raise EngineError(f"vif {vif.devid}: {ffi.string(err).decode()}")
        except BaseException:
            self.destroy()
            raise
        self._counters = lib.hv_domain_counters(self._dom)
        self._state = "created"

    def _attach_disk(self, disk, err) -> None:
        """Its backend (cext/blkback.c), on the image opened here: the C side owns the
        descriptor from then on, and closes it when the domain is destroyed."""
        try:
            fd = os.open(disk.target, (os.O_RDONLY if disk.readonly else os.O_RDWR) | os.O_CLOEXEC)
        except OSError as e:
            raise DomainError(f"disk {disk.vdev}: cannot open {disk.target} ({e.strerror})") \
                from None
        if lib.hv_blkback_attach(self._dom, disk.devid, fd, int(disk.readonly), err, len(err)) < 0:
            raise EngineError(f"disk {disk.vdev}: {ffi.string(err).decode()}")

    def _live(self):
        """Caller holds _lock: the C domain, or DomainError if it is gone."""
        if self._dom is None:
            raise DomainError(f"domain {self.name} is destroyed")
        return self._dom

    # ---- console (called on the console hub's thread) ----
    def _console_arrived(self, chunk: bytes) -> None:
        out = self._output
        out += chunk
        if len(out) > self._console_keep:
            del out[:len(out) - self._console_keep]
        for listen in self._listeners:
            try:
                listen(chunk)
            except Exception as e:          # a listener's bug must not stop the hub
                print(f"trapless: console listener of {self.name} failed: {e!r}",
                      file=__import__("sys").stderr)

    def _console_ended(self) -> None:
        self._eof.set()
        if self._on_stop is not None and self._state != "destroyed":
            try:
                self._on_stop(self)
            except Exception as e:
                print(f"trapless: stop listener of {self.name} failed: {e!r}",
                      file=__import__("sys").stderr)

    @property
    def console_output(self) -> bytes:
        """The latest console output (at most console_keep bytes)."""
        return bytes(self._output)

    @property
    def xen_log(self) -> bytes:
        """The hypervisor's log of the domain (as `xl dmesg` shows a Xen domU's): what it
        wrote with console_io once its console ring was in use, the latest 16 KiB."""
        out = ffi.new("uint8_t[]", lib.HV_XEN_LOG)
        with self._lock:
            n = lib.hv_domain_xen_log(self._live(), out, lib.HV_XEN_LOG)
        return bytes(ffi.buffer(out, n))

    def send_virq(self, virq: int, vcpu: int = 0) -> int:
        """Make a VIRQ pending (as the hypervisor's own devices do): 0 or -errno."""
        with self._lock:
            return lib.hv_domain_send_virq(self._live(), vcpu, virq)

    def send_input(self, data: bytes) -> int:
        """Queue keyboard input for CONSOLEIO_read; returns how many bytes fit."""
        buf = ffi.from_buffer(data)
        with self._lock:
            return lib.hv_domain_console_input(self._live(), buf, len(data))

    # ---- running ----
    def start(self) -> None:
        """Hand the vCPU to the scheduler. Once only."""
        with self._lock:
            self._live()
            if self._state != "created" or lib.hv_vcpu_start(self._vcpu) < 0:
                raise DomainError(f"domain {self.name} was already started")
            self._state = "started"
            self._started = True

    def _collect_stop(self) -> StopInfo | None:
        """Caller holds _lock. Why the vCPU stopped, once it has."""
        if self._stop is None and self._dom is not None and self._started:
            stop = ffi.new("struct hv_stop *")
            rc = lib.hv_vcpu_result(self._vcpu, stop)
            if rc < 0:
                return None
            kind = {lib.HV_STOP_SHUTDOWN: "shutdown", lib.HV_STOP_FAULT: "fault",
                    lib.HV_STOP_KICKED: "stopped", lib.HV_STOP_ERROR: "error"}[rc]
            info = StopInfo(kind, stop.code, stop.rip, ffi.string(stop.message).decode(),
                            stop.elapsed_ns)
            devices = self.device_stats()
            if devices and devices["pte_rejected"] and kind == "shutdown":
                info.message = (f"page-table store refused: {devices['pte_last_value']:#x} at "
                                f"guest-physical {devices['pte_last_gpa']:#x} "
                                f"(Xen errno {devices['pte_last_error']})")
            self._stop = info
        return self._stop

    def wait(self, timeout: float | None = None) -> StopInfo | None:
        """Block until the vCPU stops (None if timeout passes first)."""
        with self._lock:
            if self._state in ("building", "created"):
                raise DomainError(f"domain {self.name} was not started")
            if self._state == "destroyed" and self._stop is None:
                raise DomainError(f"domain {self.name} is destroyed")
        if not self._eof.wait(timeout):
            return None
        with self._lock:
            return self._collect_stop()

    def run(self, timeout: float | None = None) -> StopInfo:
        """Start, wait; on timeout stop the vCPU and report it as stopped."""
        self.start()
        stop = self.wait(timeout)
        if stop is None:
            self.stop()
            stop = self.wait()
            stop.message = f"timed out after {timeout:g} s"
        return stop

    def stop(self) -> None:
        """Ask the vCPU to leave the guest; wait() then returns with kind 'stopped'."""
        with self._lock:
            self._live()
            lib.hv_vcpu_kick(self._vcpu)

    def pause(self) -> None:
        with self._lock:
            self._live()
            lib.hv_vcpu_pause(self._vcpu, 1)

    def unpause(self) -> None:
        with self._lock:
            self._live()
            lib.hv_vcpu_pause(self._vcpu, 0)

    @property
    def vcpu_state(self) -> str:
        """stopped, running, blocked or paused."""
        with self._lock:
            self._live()
            return VCPU_STATES[lib.hv_vcpu_state(self._vcpu)]

    @property
    def cpu_ns(self) -> int:
        """CPU time spent running the vCPU."""
        with self._lock:
            self._live()
            return lib.hv_vcpu_cpu_ns(self._vcpu)

    @property
    def pending_events(self) -> int:
        """Event channel ports pending and not masked in shared_info (for `top`)."""
        with self._lock:
            return lib.hv_domain_pending_events(self._live())

    def trace(self, last: int = lib.HV_TRACE_ENTRIES) -> list[TraceEntry]:
        """The latest hypercalls (at most HV_TRACE_ENTRIES), oldest first."""
        last = max(0, min(int(last), lib.HV_TRACE_ENTRIES))
        out = ffi.new("struct hv_trace_entry[]", max(last, 1))
        with self._lock:
            n = lib.hv_domain_trace(self._live(), out, last)
        return [TraceEntry(e.seq, e.time_ns, e.nr, tuple(e.args), e.ret) for e in out[0:n]]

    @property
    def stop_info(self) -> StopInfo | None:
        with self._lock:
            if self._eof.is_set():
                return self._collect_stop()
            return self._stop

    def read_guest(self, vaddr: int, size: int) -> bytes:
        """Bytes of the start-of-day region by virtual address (it maps 1:1 from VIRT_BASE)."""
        phys = vaddr - self.layout.virt_base
        if not (self.layout.image_start <= phys and size >= 0 and
                phys + size <= self.layout.region_end):
            raise ValueError(f"{vaddr:#x}+{size} is outside the start-of-day region")
        with self._lock:
            return bytes(ffi.buffer(lib.hv_domain_ram(self._live()) + phys, size))

    # ---- counters ----
    def device_stats(self) -> dict | None:
        """What the emulated devices saw (native domains; None without devices)."""
        out = ffi.new("struct hv_device_stats *")
        with self._lock:
            if lib.hv_domain_device_stats(self._live(), out) < 0:
                return None
        stats = {name: getattr(out, name) for name, _ in ffi.typeof(out[0]).fields}
        stats["port_io"] = list(stats["port_io"])
        return stats

    def counters(self) -> Counters:
        """A snapshot, read while the guest runs (aligned 64-bit loads: no locking)."""
        with self._lock:
            self._live()
            c = self._counters
            hc = {HYPERCALL_NAMES.get(n, "out_of_range"): c.hypercalls[n]
                  for n in range(len(c.hypercalls)) if c.hypercalls[n]}
            he = {HYPERCALL_NAMES.get(n, "out_of_range"): c.hypercall_errors[n]
                  for n in range(len(c.hypercall_errors)) if c.hypercall_errors[n]}
            exits = {EXIT_REASON_NAMES[i]: c.exits[i] for i in range(lib.HV_EXIT_NR)}
            return Counters(exits, hc, he, c.unknown_port_io, c.upcalls, c.blocks, c.twin_entries)

    # ---- teardown ----
    def destroy(self) -> None:
        """Stop the vCPU if it runs, free the VM and guest memory, end the console. Safe to
        call twice, from any thread, in any state."""
        with self._lock:
            if self._state == "destroyed":
                return
            started = self._state == "started"
            self._state = "destroyed"
            dom = self._dom
        if dom is None:
            return
        if started:
            lib.hv_vcpu_kick(self._vcpu)
            self._eof.wait()                # the vCPU stopped: the stream ended
            with self._lock:
                self._collect_stop()
        with self._lock:
            self._dom = None
        # Stops the vCPU (if it never started, there is nothing to stop) and ends the
        # console stream; the hub reads what is left, then lets the pipe go.
        lib.hv_domain_destroy(dom)
        if self._introduced:                # the domain is gone: its keys go too
            from . import xenstore as store
            store.release(self.domid, str(self.uuid))
        self._eof.wait()
        os.close(self._console_r)
        self._console_r = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()
