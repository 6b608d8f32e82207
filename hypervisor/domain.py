"""A running domain: guest memory and counters in C, a vCPU thread, a console stream.

The vCPU thread sits inside hv_vcpu_run() (C, GIL released) until the guest stops.
Console output arrives on a pipe the C console service writes to; a reader thread
hands it to whoever listens (stdout for `run`, a buffer for tests and the console).
"""
from __future__ import annotations

import os
import threading
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from abi import HYPERCALL_NAMES, SHUTDOWN_NAMES

from . import builder, engines
from ._hv import ffi, lib
from .errors import EngineError, ImageError
from .image import PVImage, load_image

# Guest RAM ends below 0xF0000000: KVM on Intel wants a few pages under 4 GiB
# (KVM_SET_TSS_ADDR) that no memslot may cover.
MIN_MEMORY_MIB, MAX_MEMORY_MIB = 4, 3840

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
    total_exits: int = field(init=False)

    def __post_init__(self):
        self.total_exits = sum(self.exits.values())


class Domain:
    """One guest: build it, start its vCPU, wait for it, read its counters."""

    def __init__(self, image: PVImage | str | Path | bytes, *, memory_mib: int = 64,
                 cmdline: str = "", engine: str | None = None, domid: int = 1,
                 name: str = "", on_console: Callable[[bytes], None] | None = None,
                 max_evtchn_ports: int = 0, native: bool = False,
                 maxmem_mib: int | None = None):
        """memory_mib is what the domain starts with; maxmem_mib (default: the same) is
        how far it may balloon up: its guest-physical space and maximum reservation."""
        maxmem_mib = memory_mib if maxmem_mib is None else maxmem_mib
        for what, mib in (("memory", memory_mib), ("maxmem", maxmem_mib)):
            if not MIN_MEMORY_MIB <= mib <= MAX_MEMORY_MIB:
                raise ImageError(f"{what} {mib} MiB: must be between {MIN_MEMORY_MIB} and "
                                 f"{MAX_MEMORY_MIB} MiB")
        if maxmem_mib < memory_mib:
            raise ImageError(f"maxmem {maxmem_mib} MiB is below memory {memory_mib} MiB")
        self.engine = engines.choose(engine)
        start_bytes, ram_bytes = memory_mib << 20, maxmem_mib << 20
        # The image and the start-of-day region live in the memory the domain starts with.
        self.image = image if isinstance(image, PVImage) else load_image(image, start_bytes)
        # Xen's PV CPU model unless the image asks for a ring-0 kernel (builder.cpu_model);
        # a native guest is no PV guest at all and keeps ring 0.
        self.pv_model = builder.RING0 if native else builder.cpu_model(self.image)
        self.layout = builder.plan(self.image, start_bytes, self.pv_model)
        self.domid, self.name, self.cmdline = domid, name or f"d{domid}", cmdline
        self.uuid = uuid.uuid4()
        self.console_output = bytearray()
        self._listeners = [on_console] if on_console else []
        self._stop: StopInfo | None = None
        self._thread: threading.Thread | None = None

        self._console_r, self._console_w = os.pipe()
        cfg = ffi.new("struct hv_domain_config *")
        cfg.engine = engines.ENGINES[self.engine]
        cfg.domid = domid
        cfg.ram_bytes = ram_bytes
        cfg.pt_pool_start = self.layout.pt_start
        cfg.pt_pool_end = self.layout.pt_end
        cfg.console_fd = self._console_w
        cfg.handle = self.uuid.bytes
        cfg.max_evtchn_ports = max_evtchn_ports
        cfg.pv_model = self.pv_model
        err = ffi.new("char[256]")
        self._dom = lib.hv_domain_create(cfg, err, len(err))
        if self._dom == ffi.NULL:
            self._close_pipe()
            raise EngineError(f"cannot create domain: {ffi.string(err).decode()}")
        self._vcpu = lib.hv_vcpu_create(self._dom, 0, err, len(err))
        if self._vcpu == ffi.NULL:
            self.destroy()
            raise EngineError(f"cannot create vCPU: {ffi.string(err).decode()}")
        # native: the emulated PC devices an unmodified kernel drives (cext/devices.c).
        self.native = native
        if native and lib.hv_domain_add_devices(self._dom, err, len(err)) < 0:
            self.destroy()
            raise EngineError(f"cannot add devices: {ffi.string(err).decode()}")
        try:
            ram = ffi.buffer(lib.hv_domain_ram(self._dom), ram_bytes)
            boot = builder.build(memoryview(ram), self.image, self.layout, cmdline,
                                 self.pv_model)
        except Exception:
            self.destroy()
            raise
        if lib.hv_mm_init(self._dom, boot.cr3, err, len(err)) < 0 or (
                ram_bytes > start_bytes and
                lib.hv_mm_set_reservation(self._dom, start_bytes >> 12, err, len(err)) < 0) or (
                self.layout.shared_info is not None and
                lib.hv_domain_place_shared_info(self._dom, self.layout.shared_info >> 12) < 0):
            self.destroy()
            raise EngineError(f"cannot set up the domain's memory: {ffi.string(err).decode()}")
        bs = ffi.new("struct hv_boot_state *", vars(boot))
        if lib.hv_vcpu_set_boot_state(self._vcpu, bs, err, len(err)) < 0:
            self.destroy()
            raise EngineError(f"cannot set the vCPU's boot state: {ffi.string(err).decode()}")
        self._counters = lib.hv_domain_counters(self._dom)
        self._reader = threading.Thread(target=self._read_console, name=f"{self.name}-console",
                                        daemon=True)
        self._reader.start()

    # ---- console ----
    def _read_console(self) -> None:
        while True:
            try:
                chunk = os.read(self._console_r, 65536)
            except OSError:
                return
            if not chunk:
                return
            self.console_output += chunk
            for listen in self._listeners:
                listen(chunk)

    def send_virq(self, virq: int, vcpu: int = 0) -> int:
        """Make a VIRQ pending (as the hypervisor's own devices do): 0 or -errno."""
        return lib.hv_domain_send_virq(self._dom, vcpu, virq)

    def send_input(self, data: bytes) -> int:
        """Queue keyboard input for CONSOLEIO_read; returns how many bytes fit."""
        buf = ffi.from_buffer(data)
        return lib.hv_domain_console_input(self._dom, buf, len(data))

    # ---- running ----
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_vcpu, name=f"{self.name}-vcpu0",
                                        daemon=True)
        self._thread.start()

    def _run_vcpu(self) -> None:
        stop = ffi.new("struct hv_stop *")
        rc = lib.hv_vcpu_run(self._vcpu, stop)
        kind = {lib.HV_STOP_SHUTDOWN: "shutdown", lib.HV_STOP_FAULT: "fault",
                lib.HV_STOP_KICKED: "stopped", lib.HV_STOP_ERROR: "error"}[rc]
        self._stop = StopInfo(kind, stop.code, stop.rip, ffi.string(stop.message).decode(),
                              stop.elapsed_ns)
        devices = self.device_stats()
        if devices and devices["pte_rejected"] and kind == "shutdown":
            self._stop.message = (f"page-table store refused: {devices['pte_last_value']:#x} at "
                                  f"guest-physical {devices['pte_last_gpa']:#x} "
                                  f"(Xen errno {devices['pte_last_error']})")
        # The guest can write no more: close our end so the reader drains and ends.
        os.close(self._console_w)
        self._console_w = -1

    def wait(self, timeout: float | None = None) -> StopInfo | None:
        """Block until the vCPU stops (None if timeout passes first)."""
        if self._thread is None:
            raise RuntimeError("domain not started")
        self._thread.join(timeout)
        if self._thread.is_alive():
            return None
        self._reader.join()
        return self._stop

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
        """Ask the vCPU to leave the guest; run() returns with kind 'stopped'."""
        lib.hv_vcpu_kick(self._vcpu)

    def pause(self) -> None:
        lib.hv_vcpu_pause(self._vcpu, 1)

    def unpause(self) -> None:
        lib.hv_vcpu_pause(self._vcpu, 0)

    @property
    def vcpu_state(self) -> str:
        """stopped, running, blocked or paused."""
        return VCPU_STATES[lib.hv_vcpu_state(self._vcpu)]

    @property
    def cpu_ns(self) -> int:
        """CPU time the vCPU's thread has used."""
        return lib.hv_vcpu_cpu_ns(self._vcpu)

    @property
    def pending_events(self) -> int:
        """Event channel ports pending and not masked in shared_info (for `top`)."""
        return lib.hv_domain_pending_events(self._dom)

    def trace(self, last: int = lib.HV_TRACE_ENTRIES) -> list[TraceEntry]:
        """The latest hypercalls (at most HV_TRACE_ENTRIES), oldest first."""
        out = ffi.new("struct hv_trace_entry[]", last)
        n = lib.hv_domain_trace(self._dom, out, last)
        return [TraceEntry(e.seq, e.time_ns, e.nr, tuple(e.args), e.ret) for e in out[0:n]]

    @property
    def stop_info(self) -> StopInfo | None:
        return self._stop

    def read_guest(self, vaddr: int, size: int) -> bytes:
        """Bytes of the start-of-day region by virtual address (it maps 1:1 from VIRT_BASE)."""
        phys = vaddr - self.layout.virt_base
        if not (self.layout.image_start <= phys and phys + size <= self.layout.region_end):
            raise ValueError(f"{vaddr:#x}+{size} is outside the start-of-day region")
        return bytes(ffi.buffer(lib.hv_domain_ram(self._dom) + phys, size))

    # ---- counters ----
    def device_stats(self) -> dict | None:
        """What the emulated devices saw (native domains; None without devices)."""
        out = ffi.new("struct hv_device_stats *")
        if self._dom is None or lib.hv_domain_device_stats(self._dom, out) < 0:
            return None
        stats = {name: getattr(out, name) for name, _ in ffi.typeof(out[0]).fields}
        stats["port_io"] = list(stats["port_io"])
        return stats

    def counters(self) -> Counters:
        """A snapshot, read while the guest runs (aligned 64-bit loads: no locking)."""
        c = self._counters
        hc = {HYPERCALL_NAMES.get(n, "out_of_range"): c.hypercalls[n]
              for n in range(len(c.hypercalls)) if c.hypercalls[n]}
        he = {HYPERCALL_NAMES.get(n, "out_of_range"): c.hypercall_errors[n]
              for n in range(len(c.hypercall_errors)) if c.hypercall_errors[n]}
        exits = {EXIT_REASON_NAMES[i]: c.exits[i] for i in range(lib.HV_EXIT_NR)}
        return Counters(exits, hc, he, c.unknown_port_io, c.upcalls, c.blocks)

    # ---- teardown ----
    def _close_pipe(self) -> None:
        for fd in (self._console_w, self._console_r):
            if fd >= 0:
                os.close(fd)
        self._console_w = self._console_r = -1

    def destroy(self) -> None:
        """Stop the vCPU if running, free the VM, guest memory and the console pipe."""
        if self._thread is not None and self._thread.is_alive():
            self.stop()
            self._thread.join()
        if self._console_w >= 0:
            os.close(self._console_w)
            self._console_w = -1
        if getattr(self, "_reader", None) is not None:
            self._reader.join()
        if self._console_r >= 0:
            os.close(self._console_r)
            self._console_r = -1
        if self._dom is not None and self._dom != ffi.NULL:
            lib.hv_domain_destroy(self._dom)
        self._dom = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.destroy()
