"""Engines: what runs a domain's vCPUs. `kvm` (hardware-assisted, /dev/kvm) for now.

Selection is one place: `choose()`. TRAPLESS_NO_KVM=1 makes it behave as if
/dev/kvm were missing, so the suite can be run the way a KVM-less host runs it.
"""
from __future__ import annotations

import os

from ._hv import ffi, lib
from .errors import EngineError

ENGINES = {"kvm": lib.HV_ENGINE_KVM}


def why_unavailable(name: str) -> str | None:
    """None if the engine can run here, else a one-line reason."""
    if name not in ENGINES:
        return f"unknown engine {name!r} (known: {', '.join(ENGINES)})"
    if name == "kvm":
        if os.environ.get("TRAPLESS_NO_KVM"):
            return "KVM disabled by TRAPLESS_NO_KVM"
        why = ffi.new("char[256]")
        if not lib.hv_kvm_available(why, len(why)):
            return ffi.string(why).decode()
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
