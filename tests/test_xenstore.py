"""Xenstore: the store (cext/xenstore.c), its wire protocol on a guest's ring, the keys the
toolstack writes, and the console's xenstore verbs.

Guests speak the protocol through their ring (guest_kernel/xenstore_guest.py) on every
engine; the host checks each reply byte for byte and that a refused request changed
nothing. The store's rules themselves are checked through the same request path from
the host, acting as dom0 or as a domain."""
from __future__ import annotations

import random
import struct
import subprocess
import sys
from contextlib import contextmanager

import pytest

from abi import C
from guest_kernel.xenstore_guest import OUT_BYTES, PEEKED, Script, msg, xenstore_guest
from hypervisor import xenstore
from hypervisor.domain import Domain
from hypervisor.xenstore import XenstoreError

OK = b"OK\0"
XEN_ERRORS = {"EINVAL", "EACCES", "EEXIST", "EISDIR", "ENOENT", "ENOMEM", "ENOSPC", "EIO",
              "ENOTEMPTY", "ENOSYS", "EROFS", "EBUSY", "EAGAIN", "EISCONN", "E2BIG", "EPERM"}
DOMID = 41
HOME = f"/local/domain/{DOMID}"


def err(name: str) -> tuple[int, bytes]:
    return C.XS_ERROR, name.encode() + b"\0"


def introduce(dom: Domain, name: str) -> None:
    xenstore.introduce(dom.domid, name, str(dom.uuid), 32 * 1024, 32 * 1024,
                       (dom.layout.xenstore >> 12, dom.store_evtchn),
                       (dom.layout.console >> 12, dom.console_evtchn))


def parse(raw: bytes, count: int) -> list[tuple[int, int, int, bytes]]:
    out, pos = [], 0
    for _ in range(count):
        kind, req_id, tx, length = struct.unpack_from("<IIII", raw, pos)
        out.append((kind, req_id, tx, raw[pos + 16:pos + 16 + length]))
        pos += 16 + length
    return out


class Steps(Script):
    """A Script that also counts the messages the guest will read back."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.req = 0

    def ask(self, kind: int, payload: bytes, tx: int = 0, replies: int = 1) -> "Steps":
        self.req += 1
        self.send(msg(kind, payload, req_id=self.req, tx=tx))
        self.recv(replies)
        return self

    def recv(self, count: int) -> "Steps":
        self.count += count
        return super().recv(count)

    def peek(self, field: str) -> "Steps":
        self.count += 1
        return super().peek(field)


@pytest.fixture
def xs_guest(engine):
    """xs_guest(steps, on_sync=[callables]) -> [(type, req_id, tx_id, payload)] the guest
    read from its ring; each "sync" the guest prints runs the next callable."""
    doms = []

    def run(steps: Steps, on_sync=(), domid: int = DOMID, name: str = "xs-guest"):
        todo = list(on_sync)
        seen = [0]

        def on_console(chunk: bytes) -> None:       # the console hub's thread
            for _ in range(chunk.count(b"sync\n")):
                todo[seen[0]]()
                seen[0] += 1

        dom = Domain(xenstore_guest(steps), memory_mib=32, engine=engine, domid=domid,
                     name=name, on_console=on_console)
        doms.append(dom)
        introduce(dom, name)
        stop = dom.run(timeout=60)
        console = dom.console_output.decode()
        assert (stop.kind, stop.reason) == ("shutdown", 0), f"{stop}\n{console}"
        assert console.endswith("done\n") and seen[0] == len(todo), console
        out = int(console.split()[1], 16)
        return [(k, r, t, p) for k, r, t, p in parse(dom.read_guest(out, OUT_BYTES), steps.count)]

    yield run
    for dom in doms:
        dom.destroy()
        xenstore.release(dom.domid, str(dom.uuid))


@contextmanager
def quota(**changes):
    saved = xenstore.get_quota()
    xenstore.set_quota(xenstore.Quota(**{**vars(saved), **changes}))
    try:
        yield
    finally:
        xenstore.set_quota(saved)


# ---- a guest on its ring ----

def test_guest_reads_writes_and_lists(xs_guest):
    s = Steps()
    s.ask(C.XS_READ, b"name\0")
    s.ask(C.XS_READ, f"{HOME}/domid\0".encode())
    s.ask(C.XS_GET_DOMAIN_PATH, f"{DOMID}\0".encode())
    s.ask(C.XS_WRITE, b"data/greeting\0hello")
    s.ask(C.XS_READ, b"data/greeting\0")
    s.ask(C.XS_WRITE, b"data/big\0" + b"x" * 2048)     # more than the ring holds, both ways
    s.ask(C.XS_READ, b"data/big\0")
    s.ask(C.XS_MKDIR, b"data/dir\0")
    s.ask(C.XS_DIRECTORY, b"data\0")
    s.ask(C.XS_GET_PERMS, b"data/greeting\0")
    s.ask(C.XS_RM, b"data/dir\0")
    s.ask(C.XS_RM, b"data/dir\0")                      # absent, parent there: fine
    s.ask(C.XS_DIRECTORY, b"data\0")
    got = xs_guest(s)
    assert got == [
        (C.XS_READ, 1, 0, b"xs-guest"),
        (C.XS_READ, 2, 0, b"41"),
        (C.XS_GET_DOMAIN_PATH, 3, 0, b"/local/domain/41\0"),
        (C.XS_WRITE, 4, 0, OK),
        (C.XS_READ, 5, 0, b"hello"),
        (C.XS_WRITE, 6, 0, OK),
        (C.XS_READ, 7, 0, b"x" * 2048),
        (C.XS_MKDIR, 8, 0, OK),
        (C.XS_DIRECTORY, 9, 0, b"greeting\0big\0dir\0"),
        (C.XS_GET_PERMS, 10, 0, b"n41\0"),             # a domain owns what it creates
        (C.XS_RM, 11, 0, OK),
        (C.XS_RM, 12, 0, OK),
        (C.XS_DIRECTORY, 13, 0, b"greeting\0big\0"),
    ]
    assert xenstore.read(f"{HOME}/data/greeting") == b"hello"


def test_watches_fire_at_once_and_on_changes(xs_guest):
    s = Steps()
    s.ask(C.XS_WATCH, b"data/w\0tok\0", replies=2)
    s.ask(C.XS_WATCH, f"{HOME}/data\0abs\0".encode(), replies=2)
    s.sync()                                          # the host writes data/w
    s.recv(2)
    s.ask(C.XS_UNWATCH, b"data/w\0tok\0")
    s.ask(C.XS_UNWATCH, b"data/w\0tok\0")
    s.ask(C.XS_WRITE, b"data/w/sub\0v", replies=2)
    s.ask(C.XS_WATCH, b"data/w\0tok\0", replies=2)
    s.ask(C.XS_WATCH, b"data/w\0tok\0")
    s.ask(C.XS_RM, b"data/w\0", replies=3)
    got = xs_guest(s, on_sync=[lambda: xenstore.write(f"{HOME}/data/w", "from the host")])
    event = lambda path, token: (C.XS_WATCH_EVENT, 0, 0, f"{path}\0{token}\0".encode())
    assert got[:4] == [(C.XS_WATCH, 1, 0, OK), event("data/w", "tok"),
                       (C.XS_WATCH, 2, 0, OK), event(f"{HOME}/data", "abs")]
    # one event per watch that covers the node (relative watches hear relative paths)
    assert sorted(got[4:6]) == sorted([event("data/w", "tok"), event(f"{HOME}/data/w", "abs")])
    assert got[6:-2] == [
        (C.XS_UNWATCH, 3, 0, OK),
        (C.XS_ERROR, 4, 0, b"ENOENT\0"),
        (C.XS_WRITE, 5, 0, OK), event(f"{HOME}/data/w/sub", "abs"),
        (C.XS_WATCH, 6, 0, OK), event("data/w", "tok"),
        (C.XS_ERROR, 7, 0, b"EEXIST\0"),
        (C.XS_RM, 8, 0, OK),
    ]
    assert sorted(got[-2:]) == sorted([event("data/w", "tok"), event(f"{HOME}/data/w", "abs")])


def test_transactions_commit_and_conflict(xs_guest):
    s = Steps()
    s.ask(C.XS_TRANSACTION_START, b"\0")
    s.ask(C.XS_WRITE, b"data/t\0a", tx=1)
    s.ask(C.XS_READ, b"data/t\0")                      # not visible outside yet
    s.ask(C.XS_READ, b"data/t\0", tx=1)
    s.ask(C.XS_TRANSACTION_END, b"T\0", tx=1)
    s.ask(C.XS_READ, b"data/t\0")
    s.ask(C.XS_WATCH, b"data/c\0c\0", replies=2)
    s.ask(C.XS_TRANSACTION_START, b"\0")
    s.ask(C.XS_READ, b"data/c\0", tx=2)
    s.sync()                                          # the host writes data/c meanwhile
    s.recv(1)                                         # ... which the watch reports
    s.ask(C.XS_WRITE, b"data/c\0guest", tx=2)
    s.ask(C.XS_TRANSACTION_END, b"T\0", tx=2)
    s.ask(C.XS_READ, b"data/c\0")
    s.ask(C.XS_TRANSACTION_END, b"T\0", tx=2)          # gone with its conflict
    s.ask(C.XS_TRANSACTION_START, b"\0")
    s.ask(C.XS_TRANSACTION_START, b"\0", tx=3)
    s.ask(C.XS_TRANSACTION_END, b"X\0", tx=3)
    s.ask(C.XS_WRITE, b"data/f\0never", tx=3)
    s.ask(C.XS_TRANSACTION_END, b"F\0", tx=3)
    s.ask(C.XS_READ, b"data/f\0")
    s.ask(C.XS_READ, b"data/t\0", tx=77)
    got = xs_guest(s, on_sync=[lambda: xenstore.write(f"{HOME}/data/c", "host")])
    assert got == [
        (C.XS_TRANSACTION_START, 1, 0, b"1\0"),
        (C.XS_WRITE, 2, 1, OK),
        (C.XS_ERROR, 3, 0, b"ENOENT\0"),
        (C.XS_READ, 4, 1, b"a"),
        (C.XS_TRANSACTION_END, 5, 1, OK),
        (C.XS_READ, 6, 0, b"a"),
        (C.XS_WATCH, 7, 0, OK), (C.XS_WATCH_EVENT, 0, 0, b"data/c\0c\0"),
        (C.XS_TRANSACTION_START, 8, 0, b"2\0"),
        (C.XS_ERROR, 9, 2, b"ENOENT\0"),
        (C.XS_WATCH_EVENT, 0, 0, b"data/c\0c\0"),
        (C.XS_WRITE, 10, 2, OK),
        (C.XS_ERROR, 11, 2, b"EAGAIN\0"),
        (C.XS_READ, 12, 0, b"host"),                  # the conflicting write changed nothing
        (C.XS_ERROR, 13, 2, b"ENOENT\0"),
        (C.XS_TRANSACTION_START, 14, 0, b"3\0"),
        (C.XS_ERROR, 15, 3, b"EBUSY\0"),
        (C.XS_ERROR, 16, 3, b"EINVAL\0"),
        (C.XS_WRITE, 17, 3, OK),
        (C.XS_TRANSACTION_END, 18, 3, OK),
        (C.XS_ERROR, 19, 0, b"ENOENT\0"),             # aborted: never written
        (C.XS_ERROR, 20, 77, b"ENOENT\0"),            # no such transaction
    ]
    assert xenstore.read(f"{HOME}/data/c") == b"host"


def test_refusals_change_nothing(xs_guest):
    xenstore.write("/local/domain/42/secret", "s")
    owned = 11                          # the directories introduce gives the domain
    s = Steps()
    s.ask(C.XS_READ, b"/local/domain/42/secret\0")
    s.ask(C.XS_WRITE, b"/local/domain/42/x\0v")
    s.ask(C.XS_WRITE, b"name\0evil")                  # the domain may read its name only
    s.ask(C.XS_WRITE, b"data/v\0" + b"v" * 2049)      # more than a value may hold
    s.ask(C.XS_READ, b"a" * 2049 + b"\0")             # a relative path over 2048
    s.ask(C.XS_READ, b"name")                         # no NUL
    s.ask(C.XS_READ, b"data//x\0")
    s.ask(99, b"")
    s.ask(20, b"")
    s.ask(C.XS_SET_PERMS, b"data\0n0\0")              # giving its node away
    s.ask(C.XS_SET_PERMS, b"name\0n41\0")             # not its node
    s.ask(C.XS_SET_PERMS, b"data\0n41\0x1\0")
    s.ask(C.XS_WRITE, b"data/q1\0a")
    s.ask(C.XS_WRITE, b"data/q2\0b")                  # the last node its quota allows
    s.ask(C.XS_WRITE, b"data/q3\0c")
    s.ask(C.XS_WATCH, b"data\0one\0", replies=2)
    s.ask(C.XS_WATCH, b"data\0two\0")
    s.ask(C.XS_TRANSACTION_START, b"\0")
    s.ask(C.XS_TRANSACTION_START, b"\0")
    s.ask(C.XS_INTRODUCE, b"7\0" b"1\0" b"1\0")       # dom0's
    s.ask(C.XS_DIRECTORY, b"data\0")
    try:
        with quota(entries=owned + 2, watches=1, transactions=1):
            got = xs_guest(s)
        replies = [(k, p) for k, _, _, p in got]
        assert replies == [
            err("EACCES"), err("EACCES"), err("EACCES"), err("ENOSPC"), err("EINVAL"),
            err("EINVAL"), err("EINVAL"), err("ENOSYS"), err("ENOSYS"), err("EPERM"),
            err("EACCES"), err("EINVAL"),
            (C.XS_WRITE, OK), (C.XS_WRITE, OK), err("ENOSPC"),
            (C.XS_WATCH, OK), (C.XS_WATCH_EVENT, b"data\0one\0"), err("E2BIG"),
            (C.XS_TRANSACTION_START, b"1\0"), err("ENOSPC"),
            err("EACCES"),
            (C.XS_DIRECTORY, b"q1\0q2\0"),
        ]
        assert xenstore.read("/local/domain/42/secret") == b"s"
        assert xenstore.directory("/local/domain/42") == ["secret"]
        assert xenstore.read(f"{HOME}/name") == b"xs-guest"
        assert xenstore.get_perms(f"{HOME}/data") == ["n41"]
    finally:
        xenstore.rm("/local/domain/42")


def test_a_broken_ring_is_dropped_until_the_guest_reconnects(xs_guest):
    s = Steps()
    s.send(msg(C.XS_READ, b"", length=C.XENSTORE_PAYLOAD_MAX + 1))   # longer than allowed
    s.peek("error")
    s.ask(C.XS_READ, b"name\0", replies=0)            # not served: no reply
    s.peek("error")
    s.poke("connection", C.XENSTORE_RECONNECT)
    s.peek("connection")
    s.peek("error")
    s.ask(C.XS_READ, b"name\0")
    s.poke("req_prod", 0x80000000)                    # indexes no frontend produces
    s.peek("error")
    s.poke("connection", C.XENSTORE_RECONNECT)
    s.ask(C.XS_READ, b"domid\0")
    got = xs_guest(s)
    peeked = lambda value: (PEEKED, value, 0, b"")
    assert got == [peeked(C.XENSTORE_ERROR_PROTO), peeked(C.XENSTORE_ERROR_PROTO),
                   peeked(C.XENSTORE_CONNECTED), peeked(C.XENSTORE_ERROR_NONE),
                   (C.XS_READ, 2, 0, b"xs-guest"),
                   peeked(C.XENSTORE_ERROR_RINGIDX),
                   (C.XS_READ, 3, 0, b"41")]
    assert xenstore.stats(DOMID).ring_error == C.XENSTORE_ERROR_NONE


# ---- the store's rules, from the host ----

@pytest.fixture
def two_domains():
    """Domains 51 and 52 with rings and their keys, never started."""
    doms = [Domain(xenstore_guest(Script()), memory_mib=32, domid=d, name=f"d{d}")
            for d in (51, 52)]
    for dom in doms:
        introduce(dom, dom.name)
    yield doms
    for dom in doms:
        dom.destroy()
        xenstore.release(dom.domid, str(dom.uuid))


def test_permissions(two_domains):
    a, b = 51, 52
    xenstore.write(f"/local/domain/{a}/data/x", "1", domid=a)
    assert xenstore.get_perms(f"/local/domain/{a}/data/x") == ["n51"]
    assert xenstore.read(f"/local/domain/{a}/name", domid=a) == b"d51"
    for call in (lambda: xenstore.read(f"/local/domain/{a}/data/x", domid=b),
                 lambda: xenstore.read(f"/local/domain/{a}/name", domid=b),
                 lambda: xenstore.write(f"/local/domain/{a}/name", "x", domid=a),
                 lambda: xenstore.set_perms(f"/local/domain/{a}/data/x", ["n51"], domid=b),
                 lambda: xenstore.read("/vm", domid=a)):
        with pytest.raises(XenstoreError) as e:
            call()
        assert e.value.error == "EACCES"
    # granted: b may read, not write; the owner stays a
    xenstore.set_perms(f"/local/domain/{a}/data/x", ["n51", "r52"], domid=a)
    assert xenstore.read(f"/local/domain/{a}/data/x", domid=b) == b"1"
    with pytest.raises(XenstoreError, match="EACCES"):
        xenstore.write(f"/local/domain/{a}/data/x", "2", domid=b)
    with pytest.raises(XenstoreError, match="EPERM"):
        xenstore.set_perms(f"/local/domain/{a}/data/x", ["n52"], domid=a)
    # b for both, and a default for everyone else
    xenstore.set_perms(f"/local/domain/{a}/data/x", ["r51", "b52"], domid=a)
    xenstore.write(f"/local/domain/{a}/data/x", "3", domid=b)
    assert xenstore.get_perms(f"/local/domain/{a}/data/x") == ["r51", "b52"]
    # a node b creates under a's directory is b's (it counts against b's quota)
    xenstore.set_perms(f"/local/domain/{a}/data", ["n51", "w52"], domid=a)
    xenstore.write(f"/local/domain/{a}/data/fromb", "hi", domid=b)
    assert xenstore.get_perms(f"/local/domain/{a}/data/fromb") == ["n52", "w52"]
    # dom0 may do anything
    assert xenstore.read(f"/local/domain/{a}/data/x") == b"3"
    xenstore.set_perms(f"/local/domain/{a}/data/x", ["n0"])
    with pytest.raises(XenstoreError, match="EACCES"):
        xenstore.read(f"/local/domain/{a}/data/x", domid=a)


def test_transactions_from_the_host():
    xenstore.write("/test/tx", "0")
    t = xenstore.transaction_start()
    xenstore.write("/test/tx", "1", tx=t)
    assert xenstore.read("/test/tx") == b"0" and xenstore.read("/test/tx", tx=t) == b"1"
    xenstore.transaction_end(t)
    assert xenstore.read("/test/tx") == b"1"
    t = xenstore.transaction_start()
    xenstore.rm("/test/tx", tx=t)
    xenstore.write("/test/other", "x")               # committed meanwhile
    with pytest.raises(XenstoreError, match="EAGAIN"):
        xenstore.transaction_end(t)
    assert xenstore.read("/test/tx") == b"1"
    t = xenstore.transaction_start()
    xenstore.write("/test/tx", "2", tx=t)
    xenstore.transaction_end(t, commit=False)
    assert xenstore.read("/test/tx") == b"1"
    with pytest.raises(XenstoreError, match="ENOENT"):
        xenstore.transaction_end(t)
    xenstore.rm("/test")


def test_transactions_conflict_per_node_as_xenstored():
    """EAGAIN only if a node the transaction read or changed was changed meanwhile
    (a node it found missing: its parent, where it would appear)."""
    xenstore.write("/test/a", "0")
    xenstore.write("/test/b", "0")
    t = xenstore.transaction_start()
    assert xenstore.read("/test/a", tx=t) == b"0"
    xenstore.write("/test/a", "1", tx=t)
    xenstore.write("/test/b", "host")                # a node it never touched
    xenstore.write("/elsewhere/x", "host")
    xenstore.transaction_end(t)
    assert (xenstore.read("/test/a"), xenstore.read("/test/b")) == (b"1", b"host")

    t = xenstore.transaction_start()
    assert xenstore.read("/test/b", tx=t) == b"host"  # only read ...
    xenstore.write("/test/c", "new", tx=t)
    xenstore.write("/test/b", "again")               # ... but changed meanwhile
    with pytest.raises(XenstoreError, match="EAGAIN"):
        xenstore.transaction_end(t)
    with pytest.raises(XenstoreError, match="ENOENT"):
        xenstore.read("/test/c")                     # nothing of it was committed

    t = xenstore.transaction_start()
    with pytest.raises(XenstoreError, match="ENOENT"):
        xenstore.read("/test/later", tx=t)
    xenstore.write("/test/later", "now there")       # what it read as missing appeared
    with pytest.raises(XenstoreError, match="EAGAIN"):
        xenstore.transaction_end(t)

    # removed and made anew in one transaction: the old children go, the new one stays
    xenstore.write("/test/d/old1", "x")
    xenstore.write("/test/d/old2/deep", "x")
    t = xenstore.transaction_start()
    xenstore.rm("/test/d", tx=t)
    xenstore.write("/test/d/new", "y", tx=t)
    assert xenstore.directory("/test/d", tx=t) == ["new"]
    assert xenstore.directory("/test/d") == ["old1", "old2"]
    xenstore.transaction_end(t)
    assert xenstore.walk("/test/d") == [("/test/d", b""), ("/test/d/new", b"y")]
    xenstore.rm("/test")
    xenstore.rm("/elsewhere")


def test_a_transaction_copies_only_the_nodes_it_uses(two_domains):
    """A store of thousands of nodes: a transaction that reads one node holds copies of
    the nodes on its path, not of the tree; one that lists a directory, of its children."""
    for i in range(2600):
        xenstore.write(f"/local/domain/51/data/many/k{i:04d}", "v")
    for i in range(400):
        xenstore.write(f"/local/domain/51/data/few/k{i:03d}", "v")
    t = xenstore.transaction_start(domid=51)
    assert xenstore.stats(51).tx_nodes == 1                   # the root
    assert xenstore.read("data/many/k0042", domid=51, tx=t) == b"v"
    # /, local, domain, 51, data, many, k0042
    assert xenstore.stats(51).tx_nodes == 7
    assert len(xenstore.directory("data/few", domid=51, tx=t)) == 400
    assert xenstore.stats(51).tx_nodes == 7 + 1 + 400
    xenstore.write("data/many/k0042", "w", domid=51, tx=t)
    xenstore.transaction_end(t, domid=51)
    assert xenstore.stats(51).tx_nodes == 0
    assert xenstore.read("/local/domain/51/data/many/k0042") == b"w"
    assert xenstore.read("/local/domain/51/data/many/k2599") == b"v"
    xenstore.rm("/local/domain/51/data")


def test_a_committed_transaction_counts_its_nodes_to_their_owners(two_domains):
    """Nodes a domain makes in a transaction count against its quota once committed,
    and leave its count when a transaction removing them commits; aborted, nothing."""
    before = xenstore.stats(51).entries
    t = xenstore.transaction_start(domid=51)
    xenstore.write("data/q/a", "1", domid=51, tx=t)
    xenstore.write("data/q/b", "2", domid=51, tx=t)
    assert xenstore.stats(51).entries == before           # not yet
    xenstore.transaction_end(t, domid=51)
    assert xenstore.stats(51).entries == before + 3       # q, a, b
    t = xenstore.transaction_start(domid=51)
    xenstore.rm("data/q/a", domid=51, tx=t)
    xenstore.transaction_end(t, commit=False, domid=51)
    assert xenstore.stats(51).entries == before + 3
    t = xenstore.transaction_start(domid=51)
    xenstore.rm("data/q", domid=51, tx=t)
    xenstore.transaction_end(t, domid=51)
    assert xenstore.stats(51).entries == before


def test_paths_and_removal():
    for bad in ("/a//b", "/a/", "/a b", "/a/" + "x" * 3072, "", "/é"):
        with pytest.raises(XenstoreError, match="EINVAL"):
            xenstore.write(bad, "v")
    with pytest.raises(XenstoreError, match="EINVAL"):
        xenstore.rm("/")
    xenstore.mkdir("/test")
    xenstore.rm("/test/absent")                        # absent, its parent there: fine
    with pytest.raises(XenstoreError, match="ENOENT"):
        xenstore.rm("/test/absent/deeper")             # its parent missing: not fine
    xenstore.write("/test/a/b/c", "deep")              # parents appear, empty
    assert xenstore.read("/test/a") == b"" and xenstore.directory("/test/a/b") == ["c"]
    for i in range(400):                               # 400 * 11 bytes > one reply
        xenstore.mkdir(f"/test/many/child{i:05d}")
    with pytest.raises(XenstoreError, match="E2BIG"):
        xenstore.directory("/test/many")
    xenstore.rm("/test")
    with pytest.raises(XenstoreError, match="ENOENT"):
        xenstore.read("/test/a/b/c")
    assert xenstore.request(C.XS_GET_DOMAIN_PATH, b"7\0") == b"/local/domain/7\0"
    with pytest.raises(XenstoreError, match="ESRCH"):
        xenstore.read("/", domid=999)                  # no ring: no requests as it


def test_toolstack_writes_the_keys_and_removes_them(tmp_path):
    from hypervisor.config import DomainConfig
    from hypervisor.toolstack import Toolstack
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(xenstore_guest(Script().sync().sync()))     # prints, then powers off
    ts = Toolstack()
    try:
        rec = ts.create(DomainConfig(kernel=kernel, name="keys", memory=32, maxmem=48,
                                     vcpus=2, maxvcpus=3, on_poweroff="preserve"))
        home = f"/local/domain/{rec.domid}"
        dom = rec.domain
        vm = f"/vm/{dom.uuid}"
        assert xenstore.walk(home) == [
            (home, b""), (f"{home}/vm", vm.encode()), (f"{home}/name", b"keys"),
            (f"{home}/domid", str(rec.domid).encode()), (f"{home}/memory", b""),
            (f"{home}/memory/static-max", b"49152"), (f"{home}/memory/target", b"32768"),
            (f"{home}/cpu", b""), (f"{home}/cpu/0", b""), (f"{home}/cpu/0/availability", b"online"),
            (f"{home}/cpu/1", b""), (f"{home}/cpu/1/availability", b"online"),
            (f"{home}/cpu/2", b""), (f"{home}/cpu/2/availability", b"offline"),
            (f"{home}/store", b""),
            (f"{home}/store/ring-ref", str(dom.layout.xenstore >> 12).encode()),
            (f"{home}/store/port", b"1"), (f"{home}/console", b""),
            (f"{home}/console/ring-ref", str(dom.layout.console >> 12).encode()),
            (f"{home}/console/port", b"2"), (f"{home}/console/limit", b"1048576"),
            (f"{home}/console/type", b"xenconsoled"), (f"{home}/control", b""),
            (f"{home}/control/shutdown", b""), (f"{home}/control/feature-poweroff", b""),
            (f"{home}/control/feature-reboot", b""), (f"{home}/control/feature-suspend", b""),
            (f"{home}/control/sysrq", b""), (f"{home}/device", b""), (f"{home}/data", b""),
            (f"{home}/drivers", b""), (f"{home}/feature", b""), (f"{home}/attr", b""),
            (f"{home}/error", b"")]
        assert xenstore.get_perms(home) == ["n0", f"r{rec.domid}"]
        assert xenstore.get_perms(f"{home}/device") == [f"n{rec.domid}"]
        assert xenstore.get_perms(f"{home}/control/feature-poweroff") == [f"n{rec.domid}"]
        assert xenstore.walk(vm) == [(vm, b""), (f"{vm}/uuid", str(dom.uuid).encode()),
                                     (f"{vm}/name", b"keys")]
        ts.destroy(rec)
        with pytest.raises(XenstoreError, match="ENOENT"):
            xenstore.read(home)
        with pytest.raises(XenstoreError, match="ENOENT"):
            xenstore.read(vm)
    finally:
        ts.shutdown()


def test_toolstack_writes_a_disks_frontend_and_backend_directories(tmp_path):
    """disk = [...] as libxl writes it: the frontend's directory the domain's own (the
    backend reads it), the backend's dom0's (the domain reads it), both Initialising;
    destroying the domain removes both."""
    from hypervisor import config
    from hypervisor.toolstack import Toolstack
    kernel = tmp_path / "k.elf"
    kernel.write_bytes(xenstore_guest(Script().sync()))
    image = tmp_path / "disk.img"
    image.write_bytes(bytes(1 << 20))
    cfg = config.load(kernel, ["name=disks", "on_poweroff=preserve",
                               f"disk=format=raw, vdev=xvda, access=rw, target={image}",
                               f"disk={image},raw,xvdb,ro"])
    ts = Toolstack()
    try:
        rec = ts.create(cfg)
        d = rec.domid
        front, back = f"/local/domain/{d}/device/vbd/51712", f"/local/domain/0/backend/vbd/{d}/51712"
        assert xenstore.directory(f"/local/domain/{d}/device/vbd") == ["51712", "51728"]
        assert dict(xenstore.walk(front)[1:]) == {
            f"{front}/backend": back.encode(), f"{front}/backend-id": b"0",
            f"{front}/state": b"1", f"{front}/virtual-device": b"51712",
            f"{front}/device-type": b"disk"}
        walked = dict(xenstore.walk(back)[1:])
        assert {k: walked[k] for k in (f"{back}/frontend", f"{back}/frontend-id", f"{back}/online",
                                       f"{back}/dev", f"{back}/mode", f"{back}/params",
                                       f"{back}/device-type", f"{back}/type")} == {
            f"{back}/frontend": front.encode(), f"{back}/frontend-id": str(d).encode(),
            f"{back}/online": b"1", f"{back}/dev": b"xvda", f"{back}/mode": b"w",
            f"{back}/params": str(image).encode(), f"{back}/device-type": b"disk",
            f"{back}/type": b"phy"}
        assert xenstore.read(f"/local/domain/0/backend/vbd/{d}/51728/mode") == b"r"
        assert xenstore.get_perms(front) == [f"n{d}", "r0"]
        assert xenstore.get_perms(back) == ["n0", f"r{d}"]
        # the domain reads its backend's directory, and may not write it
        assert xenstore.read(f"{back}/dev", domid=d) == b"xvda"
        with pytest.raises(XenstoreError, match="EACCES"):
            xenstore.write(f"{back}/mode", "w", domid=d)
        ts.destroy(rec)
        for path in (front, f"/local/domain/0/backend/vbd/{d}"):
            with pytest.raises(XenstoreError, match="ENOENT"):
                xenstore.read(path)
    finally:
        ts.shutdown()


def test_console_xenstore_verbs():
    script = ("xenstore write /test/greeting 'hello there'; xenstore read /test/greeting; "
              "xenstore write /test/sub/k v; xenstore ls /test; xenstore rm /test/sub; "
              "xenstore ls /test; xenstore read /test/sub/k; xenstore read; xenstore frob /x; "
              "xenstore rm /test; xenstore ls /test; help xenstore")
    r = subprocess.run([sys.executable, "-m", "hypervisor.console", "-c", script],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1
    assert r.stdout.splitlines()[:6] == [
        "hello there",
        'greeting = "hello there"',
        'sub = ""',
        '  k = "v"',
        'greeting = "hello there"',
        "xenstore ls [PATH] | read PATH | write PATH VALUE | rm PATH",
    ]
    assert " ".join(" ".join(r.stdout.splitlines()[6:]).split()) == (
        'the store the domains share, as dom0 sees it (xenstore-ls, -read, -write, -rm): ls '
        'prints the tree below PATH (default /) as name = "value", rm removes a node and '
        'everything below it')
    usage = "error: usage: xenstore ls [PATH] | read PATH | write PATH VALUE | rm PATH"
    assert r.stderr.splitlines() == [
        "error: xenstore read /test/sub/k: ENOENT",
        usage, usage,
        "error: xenstore ls /test: ENOENT",
    ]


def test_reset_watches_and_a_guest_that_never_reads(two_domains):
    dom = two_domains[0]
    assert xenstore.request(C.XS_WATCH, b"data\0w\0", domid=51) == OK
    xenstore.transaction_start(domid=51)
    s = xenstore.stats(51)
    assert (s.watches, s.transactions, s.events_dropped) == (1, 1, 0)
    # domain 51 never runs, so never reads its ring: its events stop at a fixed bound
    for i in range(1000):
        xenstore.write(f"/local/domain/51/data/k{i:03d}", "v")
    s = xenstore.stats(51)
    assert 0 < s.events_dropped < 1000
    ring = dom.read_guest(dom.layout.virt_base + dom.layout.xenstore, 4096)
    rsp_cons, rsp_prod = struct.unpack_from("<II", ring, 2056)
    assert rsp_prod - rsp_cons == C.XENSTORE_RING_SIZE            # full, never more
    assert xenstore.request(C.XS_RESET_WATCHES, b"", domid=51) == OK
    s = xenstore.stats(51)
    assert (s.watches, s.transactions) == (0, 0)
    xenstore.write("/local/domain/51/data/after", "v")
    assert xenstore.stats(51).events_dropped == s.events_dropped   # no watch: no event


def random_payload(rng) -> bytes:
    """Path-like pieces, NULs and noise: mostly near-valid, sometimes not."""
    pieces = [b"data", b"/", b"\0", b"name", b"/local/domain/51", b"x" * rng.randrange(3000),
              b"T", b"F", b"r52", b"n51", b"b0", b"@releaseDomain", bytes([rng.randrange(256)])]
    return b"".join(rng.choice(pieces) for _ in range(rng.randrange(8)))[:C.XENSTORE_PAYLOAD_MAX]


def test_random_requests_get_one_answer_each(two_domains):
    rng = random.Random(15)
    rtype = xenstore.ffi.new("uint32_t *")
    reply = xenstore.ffi.new(f"uint8_t[{C.XENSTORE_PAYLOAD_MAX}]")
    for _ in range(5000):
        kind, tx = rng.randrange(30), rng.choice([0, 0, 1, 2, 99])
        payload = random_payload(rng)
        n = xenstore.lib.hv_xs_request(51, kind, tx, payload, len(payload), rtype, reply)
        assert 0 <= n <= C.XENSTORE_PAYLOAD_MAX
        data = bytes(xenstore.ffi.buffer(reply, n))
        if rtype[0] == C.XS_ERROR:
            assert data[:-1].decode() in XEN_ERRORS and data[-1:] == b"\0", data
        else:
            assert rtype[0] == kind, (kind, payload, data)
    s = xenstore.stats(51)
    q = xenstore.get_quota()
    assert s.entries <= q.entries and s.watches <= q.watches and s.transactions <= q.transactions
    assert xenstore.read("/local/domain/51/name") == b"d51"     # dom0's keys stand


def test_random_messages_on_the_ring(xs_guest):
    rng = random.Random(28)
    s = Steps()
    kinds = []
    for i in range(150):
        kind = rng.randrange(30)
        if kind in (C.XS_WATCH, C.XS_WATCH_EVENT):
            kind = C.XS_READ                          # watches add events: counted elsewhere
        kinds.append(kind)
        s.ask(kind, random_payload(rng), tx=rng.choice([0, 0, 1, 7]))
    got = xs_guest(s)
    assert [r for _, r, _, _ in got] == list(range(1, 151))
    for kind, (rtype, _, _, payload) in zip(kinds, got):
        assert rtype in (kind, C.XS_ERROR)
        if rtype == C.XS_ERROR:
            assert payload[:-1].decode() in XEN_ERRORS
    assert xenstore.stats(DOMID).ring_error == C.XENSTORE_ERROR_NONE


def test_domains_coming_and_going_fire_the_special_watches(two_domains):
    a, b = two_domains
    assert xenstore.request(C.XS_WATCH, b"@releaseDomain\0gone\0", domid=51) == OK
    assert xenstore.request(C.XS_WATCH, b"@introduceDomain\0new\0", domid=51) == OK
    b.destroy()
    c = Domain(xenstore_guest(Script()), memory_mib=32, domid=53, name="d53")
    c.destroy()
    ring = a.read_guest(a.layout.virt_base + a.layout.xenstore, 4096)
    rsp_prod, = struct.unpack_from("<I", ring, 2060)
    events = parse(ring[1024:1024 + rsp_prod], 5)
    assert [(k, p) for k, _, _, p in events] == [
        (C.XS_WATCH_EVENT, b"@releaseDomain\0gone\0"),      # at once, as every watch
        (C.XS_WATCH_EVENT, b"@introduceDomain\0new\0"),
        (C.XS_WATCH_EVENT, b"@releaseDomain\0gone\0"),      # 52 went
        (C.XS_WATCH_EVENT, b"@introduceDomain\0new\0"),     # 53 came
        (C.XS_WATCH_EVENT, b"@releaseDomain\0gone\0"),      # and went
    ]


def test_removing_what_a_domain_cannot_see_says_nothing_about_it(two_domains):
    xenstore.write("/test/hidden/x", "1")
    for path in ("/test/hidden/absent", "/test/hidden/absent/deeper", "/test/hidden/x"):
        with pytest.raises(XenstoreError, match="EACCES"):
            xenstore.rm(path, domid=51)
    assert xenstore.read("/test/hidden/x") == b"1"
    xenstore.rm("/test")
