"""The store's Python side: trapless (dom0) reads and writes xenstore, as Xen's tools do.

The store itself is C (cext/xenstore.c): one per process, shared by every domain's ring.
Every call here is one wire-protocol request (the same code answers a guest's ring), made
as dom0 unless `domid` says to act as that domain (which must have a ring): a failure
raises XenstoreError carrying Xen's error name ("ENOENT", "EACCES", ...).
"""
from __future__ import annotations

from dataclasses import dataclass

from abi import C
from hypervisor._hv import ffi, lib

from .errors import TraplessError


class XenstoreError(TraplessError):
    """A request the store refused: .error is Xen's name for why (EACCES, ENOENT, ...)."""

    def __init__(self, error: str, what: str):
        super().__init__(f"{what}: {error}")
        self.error = error


def request(kind: int, payload: bytes, *, domid: int = 0, tx: int = 0) -> bytes:
    """One request (XS_* type): the reply's payload, or XenstoreError."""
    rtype = ffi.new("uint32_t *")
    reply = ffi.new(f"uint8_t[{C.XENSTORE_PAYLOAD_MAX}]")
    n = lib.hv_xs_request(domid, kind, tx, payload, len(payload), rtype, reply)
    if n == -C.XEN_ESRCH:
        raise XenstoreError("ESRCH", f"domain {domid} has no xenstore ring")
    if n == -C.XEN_E2BIG:
        raise XenstoreError("E2BIG", f"request of {len(payload)} bytes")
    data = bytes(ffi.buffer(reply, n))
    if rtype[0] == C.XS_ERROR:
        raise XenstoreError(data.rstrip(b"\0").decode(), _describe(kind, payload))
    return data


def _describe(kind: int, payload: bytes) -> str:
    path = payload.split(b"\0", 1)[0].decode(errors="replace")
    return path or f"xenstore request {kind}"


def _path(path: str) -> bytes:
    return path.encode() + b"\0"


def read(path: str, **who) -> bytes:
    return request(C.XS_READ, _path(path), **who)


def write(path: str, value: bytes | str, **who) -> None:
    request(C.XS_WRITE, _path(path) + (value.encode() if isinstance(value, str) else value), **who)


def mkdir(path: str, **who) -> None:
    request(C.XS_MKDIR, _path(path), **who)


def rm(path: str, **who) -> None:
    request(C.XS_RM, _path(path), **who)


def directory(path: str, **who) -> list[str]:
    data = request(C.XS_DIRECTORY, _path(path), **who)
    return [name.decode() for name in data.split(b"\0")[:-1]]


def get_perms(path: str, **who) -> list[str]:
    """["n0", "r1", ...]: the first is the owner and everybody else's permission."""
    return [p.decode() for p in request(C.XS_GET_PERMS, _path(path), **who).split(b"\0")[:-1]]


def set_perms(path: str, perms: list[str], **who) -> None:
    request(C.XS_SET_PERMS, _path(path) + b"".join(_path(p) for p in perms), **who)


def transaction_start(**who) -> int:
    return int(request(C.XS_TRANSACTION_START, b"\0", **who).rstrip(b"\0"))


def transaction_end(tx: int, commit: bool = True, **who) -> None:
    request(C.XS_TRANSACTION_END, b"T\0" if commit else b"F\0", tx=tx, **who)


def write_tree(base: str, values: dict[str, str | dict], perms: list[str] | None = None) -> None:
    """Write nested {name: value or {…}} under base, as dom0; perms (if given) on base."""
    if perms is not None:
        mkdir(base)
        set_perms(base, perms)
    for name, value in values.items():
        if isinstance(value, dict):
            write_tree(f"{base}/{name}", value)
        else:
            write(f"{base}/{name}", value)


def walk(path: str) -> list[tuple[str, bytes]]:
    """(path, value) of path and every node below it, depth first, as dom0."""
    out = [(path, read(path))]
    for name in directory(path):
        out += walk(f"{path.rstrip('/')}/{name}")
    return out


@dataclass
class Quota:
    entries: int
    value_bytes: int
    watches: int
    transactions: int
    perms: int


def get_quota() -> Quota:
    q = ffi.new("struct hv_xs_quota *")
    lib.hv_xs_get_quota(q)
    return Quota(q.entries, q.value_bytes, q.watches, q.transactions, q.perms)


def set_quota(quota: Quota) -> None:
    lib.hv_xs_set_quota(ffi.new("struct hv_xs_quota *", vars(quota)))


@dataclass
class Stats:
    entries: int
    watches: int
    transactions: int
    ring_error: int
    requests: int
    events_dropped: int
    tx_nodes: int


def stats(domid: int) -> Stats:
    s = ffi.new("struct hv_xs_stats *")
    if lib.hv_xs_stats(domid, s) < 0:
        raise XenstoreError("ESRCH", f"domain {domid} has no xenstore ring")
    return Stats(s.entries, s.watches, s.transactions, s.ring_error, s.requests,
                 s.events_dropped, s.tx_nodes)


# ---- what the toolstack keeps in the store for each domain (as libxl writes it) ----
CONSOLE_LIMIT = 1048576                 # libxl's console/limit: bytes xenconsoled buffers


def domain_path(domid: int) -> str:
    return f"/local/domain/{domid}"


def introduce(domid: int, name: str, uuid: str, memory_kib: int, maxmem_kib: int,
              store: tuple[int, int] | None, console: tuple[int, int] | None,
              vcpus: int = 1, vcpus_online: int | None = None) -> None:
    """Write a new domain's keys: store and console are (ring frame, port) or None;
    cpu/<n>/availability for each of its vcpus, "online" for the first vcpus_online (all
    by default), as libxl writes them from maxvcpus and vcpus.

    Permissions as libxl sets them: the home directory and /vm/<uuid> belong to dom0 and
    the domain may read them; the directories a domain fills itself (device, data,
    control/shutdown, ...) are the domain's own, closed to everybody else."""
    home, vm = domain_path(domid), f"/vm/{uuid}"
    online = vcpus if vcpus_online is None else vcpus_online
    read_only, own = ["n0", f"r{domid}"], [f"n{domid}"]
    for path in (home, vm):
        _rm_if_there(path)              # a domid or uuid used before starts clean
    write_tree(vm, {"uuid": uuid, "name": name}, read_only)
    keys: dict = {"vm": vm, "name": name, "domid": str(domid),
                  "memory": {"static-max": str(maxmem_kib), "target": str(memory_kib)},
                  "cpu": {str(n): {"availability": "online" if n < online else "offline"}
                          for n in range(vcpus)}}
    if store:
        keys["store"] = {"ring-ref": str(store[0]), "port": str(store[1])}
    if console:
        keys["console"] = {"ring-ref": str(console[0]), "port": str(console[1]),
                           "limit": str(CONSOLE_LIMIT), "type": "xenconsoled"}
    write_tree(home, keys, read_only)
    write_tree(f"{home}/control", {}, read_only)
    # the control nodes libxl makes the domain's (libxl__domain_make): Linux writes the
    # feature-* ones to say which requests it handles
    for sub in ("control/shutdown", "control/feature-poweroff", "control/feature-reboot",
                "control/feature-suspend", "control/sysrq", "device", "data", "drivers",
                "feature", "attr", "error"):
        mkdir(f"{home}/{sub}")
        set_perms(f"{home}/{sub}", own)


def vbd_paths(domid: int, devid: int) -> tuple[str, str]:
    """(frontend, backend) directories of a domain's virtual block device, as libxl names
    them; the backend is trapless = dom0."""
    return (f"{domain_path(domid)}/device/vbd/{devid}",
            f"{domain_path(0)}/backend/vbd/{domid}/{devid}")


def add_vbd(domid: int, devid: int, vdev: str, target: str, readonly: bool) -> None:
    """Write a new disk's two directories as libxl does before the domain starts, both in
    state Initialising: the frontend's (the domain's own; the backend may read it) and
    the backend's (dom0's; the domain may read it). The backend publishes its features,
    the disk's size and the later states itself."""
    front, back = vbd_paths(domid, devid)
    write_tree(front, {"backend": back, "backend-id": "0",
                       "state": str(C.XenbusStateInitialising),
                       "virtual-device": str(devid), "device-type": "disk"},
               [f"n{domid}", "r0"])
    write_tree(back, {"frontend": front, "frontend-id": str(domid), "online": "1",
                      "removable": "0", "bootable": "1",
                      "state": str(C.XenbusStateInitialising), "dev": vdev, "type": "phy",
                      "mode": "r" if readonly else "w", "device-type": "disk",
                      "params": target},
               ["n0", f"r{domid}"])


def vif_paths(domid: int, devid: int) -> tuple[str, str]:
    """(frontend, backend) directories of a domain's network card, as libxl names them."""
    return (f"{domain_path(domid)}/device/vif/{devid}",
            f"{domain_path(0)}/backend/vif/{domid}/{devid}")


def add_vif(domid: int, devid: int, mac: str, bridge: str) -> None:
    """Write a new card's two directories as libxl does before the domain starts, both in
    state Initialising, with the same permissions as a disk's. The backend publishes its
    features and the later states itself."""
    front, back = vif_paths(domid, devid)
    write_tree(front, {"backend": back, "backend-id": "0",
                       "state": str(C.XenbusStateInitialising), "handle": str(devid),
                       "mac": mac},
               [f"n{domid}", "r0"])
    write_tree(back, {"frontend": front, "frontend-id": str(domid), "online": "1",
                      "state": str(C.XenbusStateInitialising), "handle": str(devid),
                      "mac": mac, "bridge": bridge, "type": "vif"},
               ["n0", f"r{domid}"])


def release(domid: int, uuid: str) -> None:
    """The domain is gone: its keys go too, with the backend directories of its devices."""
    _rm_if_there(domain_path(domid))
    _rm_if_there(f"/vm/{uuid}")
    for kind in _ls_if_there(f"{domain_path(0)}/backend"):
        _rm_if_there(f"{domain_path(0)}/backend/{kind}/{domid}")


def _ls_if_there(path: str) -> list[str]:
    try:
        return directory(path)
    except XenstoreError as e:
        if e.error != "ENOENT":
            raise
        return []


def _rm_if_there(path: str) -> None:
    try:
        rm(path)
    except XenstoreError as e:
        if e.error != "ENOENT":         # ENOENT: not even its parent is there
            raise
