"""Engines: what runs a domain's vCPUs. `kvm` (hardware-assisted, /dev/kvm) where
/dev/kvm works; `bt` (binary translation on Unicorn, QEMU's TCG) everywhere else.

Selection is one place: `choose()`, which takes the first usable engine in ENGINES
order. TRAPLESS_NO_KVM=1 makes it behave as if /dev/kvm were missing, so the suite can
be run the way a KVM-less host runs it; TRAPLESS_NO_BT=1 does the same for Unicorn.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from pathlib import Path

from ._hv import ffi, lib
from .errors import EngineError

ENGINES = {"kvm": lib.HV_ENGINE_KVM, "bt": lib.HV_ENGINE_BT}


# trapless's patched Unicorn (third_party/unicorn, built by `make setup`): kicks from
# other threads stop it exactly, so bt needs no per-block hook
PATCHED_UNICORN = Path(__file__).resolve().parent.parent / "build" / "unicorn" / "libunicorn.so.2"


def unicorn_library() -> Path | None:
    """The libunicorn bt runs on: TRAPLESS_UNICORN if set to a path, else the patched
    build when `make setup` made it (unless TRAPLESS_UNICORN=stock), else the one the
    unicorn package ships (found without importing the package)."""
    chosen = os.environ.get("TRAPLESS_UNICORN", "")
    if chosen and chosen != "stock":
        return Path(chosen)
    if chosen != "stock" and PATCHED_UNICORN.is_file():
        return PATCHED_UNICORN
    spec = importlib.util.find_spec("unicorn")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for name in ("libunicorn.so.2", "libunicorn.so"):
            path = Path(folder) / "lib" / name
            if path.is_file():
                return path
    return None


@functools.cache
def _load_unicorn() -> str | None:
    """Hand libunicorn to the C extension once; None, or why bt cannot run."""
    path = unicorn_library()
    if path is None:
        if importlib.util.find_spec("unicorn") is None:
            return "the unicorn package is not installed (pip install unicorn==2.1.4)"
        return "the unicorn package has no libunicorn (pip install unicorn==2.1.4)"
    err = ffi.new("char[256]")
    if lib.hv_bt_init(str(path).encode(), err, len(err)) < 0:
        return ffi.string(err).decode()
    return None


def bt_library_note() -> str:
    """One line: which libunicorn bt runs on, and how it stops for a kick."""
    why = why_unavailable("bt")
    if why:
        return f"bt unavailable: {why}"
    how = ("exact kicks (uc_kick), no block hook" if lib.hv_bt_exact_kicks()
           else "stock: kicks through a block hook")
    if lib.hv_bt_hook_goto():
        how += "; hooks move rip within cpu_exec (uc_reg_write_batch_goto)"
    return f"bt runs on {unicorn_library()} ({how})"


def why_unavailable(name: str) -> str | None:
    """None if the engine can run here, else a one-line reason."""
    if name not in ENGINES:
        return f"unknown engine {name!r} (known: {', '.join(ENGINES)})"
    why = ffi.new("char[256]")
    if name == "kvm":
        if os.environ.get("TRAPLESS_NO_KVM"):
            return "KVM disabled by TRAPLESS_NO_KVM"
        if not lib.hv_kvm_available(why, len(why)):
            return ffi.string(why).decode()
        # a kvm vCPU's compat-mode code runs on a Unicorn twin (cext/bt_twin.c): load the
        # library too where it is there (without it, such code stops the domain)
        if not os.environ.get("TRAPLESS_NO_BT"):
            _load_unicorn()
    if name == "bt":
        if os.environ.get("TRAPLESS_NO_BT"):
            return "bt disabled by TRAPLESS_NO_BT"
        reason = _load_unicorn()
        if reason:
            return reason
        if not lib.hv_bt_available(why, len(why)):
            return ffi.string(why).decode()
    return None


def compat_mode_unavailable(name: str) -> str | None:
    """None if engine `name` runs a Xen PV guest's 32-bit compat-mode code: bt does it
    itself, kvm on a Unicorn twin of the vCPU (cext/bt_twin.c), so only where bt can
    run too; else why not."""
    if name == "kvm":
        why = why_unavailable("bt")
        if why:
            return f"kvm runs compat-mode code on a Unicorn twin, and {why}"
    return None


def available() -> list[str]:
    return [name for name in ENGINES if why_unavailable(name) is None]


def choose(requested: str | None = None) -> str:
    """The engine to use: the one asked for, else the best one this host has."""
    if requested:
        why = why_unavailable(requested)
        if why:
            raise EngineError(f"engine {requested}: {why}")
        return requested
    reasons = []
    for name in ENGINES:
        why = why_unavailable(name)
        if why is None:
            return name
        reasons.append(f"{name}: {why}")
    raise EngineError("no engine can run here (" + "; ".join(reasons) + ")")


def fallback_note() -> str | None:
    """One line when choose() would pass over a better engine, e.g. "kvm unavailable
    (/dev/kvm does not exist (no KVM on this host)); using bt"; None if it would not."""
    skipped = []
    for name in ENGINES:
        why = why_unavailable(name)
        if why is None:
            if not skipped:
                return None
            return "; ".join(f"{n} unavailable ({w})" for n, w in skipped) + f"; using {name}"
        skipped.append((name, why))
    return None
