"""A network frontend for trapless's own PV kernel: a Xen virtual network card, used as a
domU uses it, enough for two domains on one bridge to ping each other.

With the word `netfront` on its command line the kernel finds its card in xenstore (the
first entry of device/vif, its backend's directory in `backend`, its MAC in `mac`),
grants the backend a tx ring, an rx ring, a tx page and RX_BUFFERS rx pages, allocates
an event channel for dom0, publishes tx-ring-ref, rx-ring-ref, event-channel and
request-rx-copy, goes to Initialised and waits for the backend to be Connected (the
XenbusState handshake of io/netif.h), then posts its rx pages.

Its address is `ip=A.B.C.D`. With `peer=A.B.C.D pings=N` it asks for the peer's MAC
(ARP), sends N ICMP echo requests one after the other, each waiting for its reply, and
powers off; without them it answers ARP requests for its address and echo requests to
it until it is destroyed. With `quiet` neither prints a line per echo, and the pinger
ends with "netfront: N round trips in T ns" (the PV clock). With `flood=N` (and `peer=`)
the pinger sends its ARP request N times instead, not waiting for an answer; with
`norx` a card posts no rx pages at all (a port that takes nothing). With `badtx` it sends tx
requests a backend must refuse and prints each status instead (guest_kernel's check of
netback's validation). An echo whose IP or ICMP checksum does not hold is dropped. Either way it answers what it is asked while it waits. Every
wait polls the rings, yielding; a wait for an answer gives up after `wait_ms=` (default
WAIT_MS) milliseconds of the PV clock. The console:

    netfront: device 0, backend /local/domain/0/backend/vif/1/0, mac 00:16:3e:00:00:01
    netfront: connected, ip 10.0.0.1
    netfront: arp who-has 10.0.0.2
    netfront: 10.0.0.2 is at 00:16:3e:00:00:02
    netfront: echo request to 10.0.0.2 icmp_seq=1
    netfront: echo reply from 10.0.0.2 icmp_seq=1
    ...
    netfront: 3 sent, 3 received
and on the peer
    netfront: arp request from 10.0.0.1, replied
    netfront: echo request from 10.0.0.1 icmp_seq=1, replied
"""
from __future__ import annotations

from abi import C, offsetof

from .asm import (al, ax, bl, byte, cx, dl, dword, dx, eax, ebx, ecx, edi, edx, esi, ptr, qword,
                  r8, r8d, r9, r12, r13, r14, r15, rax, rbx, rcx, rdi, rdx, rip, rsi, si, word)
from .blkfront import (crash_unless_je,
                       emit_find_device, emit_map_grant_table, emit_wait_backend_closing,
                       emit_wait_connected, grant_page)
from .pvlib import crash_unless
from .runtime import PVProgram

TX_RING_REF, RX_RING_REF, TX_BUF_REF, RX_BUF_REF = 64, 65, 66, 68   # beside blkfront's
RX_BUFFERS = 16
UNGRANTED_REF = 67                      # an entry it never fills
BAD_AHEAD = 1000                        # a tx req_prod this far ahead breaks the card
RING_HEADER = C.NET_RING_HEADER
TX_SLOT, RX_SLOT = 12, 8                # a slot of each ring (request/response union)
WAIT_MS = 10_000                        # a wait's limit unless wait_ms= says otherwise
SAVED = (rbx, r12, r13, r14, r15)
ICMP_ID = 0x7470                        # our echo requests' identifier
PAYLOAD = b"trapless netfront ping payload!!"   # 32 bytes after the ICMP header
ECHO_LEN = 14 + 20 + 8 + len(PAYLOAD)   # 74
ARP_LEN = 42
# offsets in a frame
ETH_DST, ETH_SRC, ETH_TYPE = 0, 6, 12
ARP_OP, ARP_SHA, ARP_SPA, ARP_THA, ARP_TPA = 20, 22, 28, 32, 38
IP_VHL, IP_LEN, IP_PROTO, IP_SUM, IP_SRC, IP_DST = 14, 16, 23, 24, 26, 30
ICMP_TYPE, ICMP_SUM, ICMP_ID_AT, ICMP_SEQ = 34, 36, 38, 40

_arp_request = (b"\xff" * 6 + b"\0" * 6 + b"\x08\x06" + b"\x00\x01\x08\x00\x06\x04\x00\x01"
                + b"\0" * 6 + b"\0" * 4 + b"\0" * 6 + b"\0" * 4)
_echo_request = (b"\0" * 12 + b"\x08\x00"
                 + bytes([0x45, 0, 0, ECHO_LEN - 14, 0, 0, 0x40, 0, 64, 1, 0, 0]) + b"\0" * 8
                 + bytes([8, 0, 0, 0, ICMP_ID >> 8, ICMP_ID & 0xFF, 0, 0]) + PAYLOAD)
assert len(_arp_request) == ARP_LEN and len(_echo_request) == ECHO_LEN


def emit_netfront_check(p: PVProgram) -> None:
    """Emit, in main: with the word `netfront` on the command line, run the frontend and
    power off after it (the PV kernel's hook)."""
    a = p.a
    p.load_arg(rdi, p.string("netfront"))
    a.call("cmdline_has_word")
    a.test(rax, rax)
    a.je("netfront.skip")
    a.call("netfront_main")
    a.mov(eax, C.SHUTDOWN_poweroff)
    a.ret()
    a.label("netfront.skip")


def _load_be16(p: PVProgram, reg32, base, at: int) -> None:
    """reg32 (not edx) = the big-endian 16-bit value at base + at; clobbers edx."""
    a = p.a
    a.movzx(reg32, byte[base + at])
    a.shl(reg32, 8)
    a.movzx(edx, byte[base + at + 1])
    a.or_(reg32, edx)


def _store_be16(p: PVProgram, base, at: int) -> None:
    """The low 16 bits of eax, big-endian, at base + at (uses edx)."""
    a = p.a
    a.mov(byte[base + at + 1], al)
    a.mov(edx, eax)
    a.shr(edx, 8)
    a.mov(byte[base + at], dl)


def _copy(p: PVProgram, dst: str, dst_at: int, src, src_at: int, n: int) -> None:
    """(inline) n bytes (even: a MAC) from src + src_at (a register or a label) to label
    dst + dst_at, a word at a time through eax."""
    assert n % 2 == 0
    a = p.a
    for i in range(0, n, 2):
        a.movzx(eax, word[(rip + src if isinstance(src, str) else src) + src_at + i])
        a.mov(word[rip + dst + dst_at + i], ax)


def emit_netfront(p: PVProgram) -> None:
    """netfront_main() -> rax = 0: the frontend and its routines. It uses the xenstore
    client, the number routines and the data (setup, frames, unbound, xs_*, gt, front,
    back, number) that emit_blkfront emits into the same kernel."""
    a = p.a
    a.label("netfront_main")
    for reg in SAVED:
        a.push(reg)
    a.mov(rax, qword["start_info_ptr"])
    a.mov(r12, qword[rax + offsetof("start_info", "store_mfn")])
    a.shl(r12, 12)
    a.mov(ecx, dword[rax + offsetof("start_info", "store_evtchn")])
    a.mov(dword["xs_port"], ecx)

    # its address (and the peer's) from the command line
    a.lea(rdi, ptr[p.string("ip=")])
    a.call("nf_cmdline_ip")
    a.cmp(rax, -1)
    a.jne("nf.have_ip")
    p.print("netfront: no ip=A.B.C.D on the command line\n")
    a.mov(edi, C.SHUTDOWN_crash)
    a.call("shutdown")
    a.label("nf.have_ip")
    a.mov(dword["nf_ip"], eax)
    a.lea(rdi, ptr[p.string("peer=")])
    a.call("nf_cmdline_ip")
    a.mov(dword["nf_peer"], eax)
    a.lea(rdi, ptr[p.string("pings=")])
    a.call("cmdline_number")
    a.mov(qword["nf_pings"], rax)
    a.lea(rdi, ptr[p.string("quiet")])
    a.call("cmdline_has_word")
    a.mov(dword["nf_quiet"], eax)
    a.lea(rdi, ptr[p.string("wait_ms=")])
    a.call("cmdline_number")
    a.cmp(rax, -1)
    a.jne("nf.have_wait")
    a.mov(eax, WAIT_MS)
    a.label("nf.have_wait")
    a.imul(rax, rax, 1_000_000)
    a.mov(qword["nf_wait_ns"], rax)
    # the PV clock times the waits: shared_info mapped (events stay masked)
    a.call("events_init")
    crash_unless(p, "je", "netfront: events_init: ")

    # the card: the first device/vif entry, its backend and its MAC
    emit_find_device(p, "netfront", "vif", "card")
    a.lea(rdi, ptr["front"])
    a.lea(rsi, ptr[p.string("mac")])
    a.call("xs_read")
    a.cmp(eax, C.XS_READ)
    crash_unless_je(p, "netfront: no mac key: ")
    p.print(", mac ")
    a.lea(rdi, ptr["xs_reply"])
    a.call("print_cstr")
    p.print("\n")
    for i in range(6):                  # "aa:bb:cc:dd:ee:ff" -> six bytes
        a.lea(rsi, ptr[rip + "xs_reply" + 3 * i])
        a.call("nf_hex_byte")
        a.mov(byte[rip + "nf_mac" + i], al)

    # grants: the two rings, the tx page, the rx pages; the rings' event indexes
    emit_map_grant_table(p, "netfront")
    grant_page(p, TX_RING_REF, "nf_tx_ring")
    grant_page(p, RX_RING_REF, "nf_rx_ring")
    grant_page(p, TX_BUF_REF, "nf_tx_buf")
    for i in range(RX_BUFFERS):
        grant_page(p, RX_BUF_REF + i, "nf_rx_bufs", i * 4096)
    for ring in ("nf_tx_ring", "nf_rx_ring"):
        a.mov(dword[rip + ring + 4], 1)     # req_event
        a.mov(dword[rip + ring + 12], 1)    # rsp_event

    p.hypercall("event_channel_op", C.EVTCHNOP_alloc_unbound, "unbound")
    crash_unless(p, "je", "netfront: alloc_unbound: ")
    a.mov(eax, dword[rip + "unbound" + 4])     # struct evtchn_alloc_unbound: port @4
    a.mov(dword["nf_port"], eax)

    # publish, Initialised, wait for Connected
    for key, value in (("tx-ring-ref", str(TX_RING_REF)), ("rx-ring-ref", str(RX_RING_REF)),
                       ("request-rx-copy", "1"), ("feature-rx-notify", "1")):
        a.lea(rdi, ptr["front"])
        a.lea(rsi, ptr[p.string(key)])
        a.lea(rdx, ptr[p.string(value)])
        a.call("xs_write")
    a.mov(eax, dword["nf_port"])
    a.lea(rdi, ptr["number"])
    a.call("utoa")
    a.lea(rdi, ptr["front"])
    a.lea(rsi, ptr[p.string("event-channel")])
    a.lea(rdx, ptr["number"])
    a.call("xs_write")
    _set_state(p, C.XenbusStateInitialised)
    emit_wait_connected(p, "netfront", "the rings")
    _set_state(p, C.XenbusStateConnected)
    p.print("netfront: connected, ip ")
    a.mov(edi, dword["nf_ip"])
    a.call("nf_print_ip")
    p.print("\n")

    # every rx page on the rx ring: request i is page i (with `norx`: none, ever, so
    # whatever comes for it waits in the backend's queue)
    a.lea(rdi, ptr[p.string("norx")])
    a.call("cmdline_has_word")
    a.test(eax, eax)
    a.jne("nf.answer")
    for i in range(RX_BUFFERS):
        a.mov(word[rip + "nf_rx_ring" + RING_HEADER + i * RX_SLOT], i)
        a.mov(dword[rip + "nf_rx_ring" + RING_HEADER + i * RX_SLOT + 4], RX_BUF_REF + i)
    a.mov(dword["nf_rx_ring"], RX_BUFFERS)     # req_prod, after the requests
    p.hypercall("event_channel_op", C.EVTCHNOP_send, "nf_port")

    a.lea(rdi, ptr[p.string("badtx")])
    a.call("cmdline_has_word")
    a.test(eax, eax)
    a.jne("nf.badtx")
    a.cmp(dword["nf_peer"], -1)
    a.jne("nf.pinger")
    # the answering side: forever
    a.label("nf.answer")
    a.call("nf_rx")
    a.test(eax, eax)
    a.jne("nf.answer")
    p.hypercall("sched_op", C.SCHEDOP_yield, 0)
    a.jmp("nf.answer")

    # the pinging side: ARP, then the echo requests
    a.label("nf.pinger")
    p.print("netfront: arp who-has ")
    a.mov(edi, dword["nf_peer"])
    a.call("nf_print_ip")
    p.print("\n")
    a.call("nf_arp_request")
    a.lea(rdi, ptr[p.string("flood=")])
    a.call("cmdline_number")
    a.cmp(rax, -1)
    a.jne("nf.flood")
    a.mov(edi, ARP_LEN)
    a.call("nf_send")
    a.lea(rdi, ptr["nf_peer_known"])
    a.mov(esi, 1)
    a.call("nf_wait")
    a.test(eax, eax)
    a.jne("nf.arp_done")
    p.print("netfront: no arp reply\n")
    a.jmp("nf.summary")
    a.label("nf.arp_done")
    p.print("netfront: ")
    a.mov(edi, dword["nf_peer"])
    a.call("nf_print_ip")
    p.print(" is at ")
    a.call("nf_print_peer_mac")
    p.print("\n")

    a.mov(r13, 0)                       # the sequence number
    a.call("pvclock_read")
    a.mov(qword["nf_t0"], rax)
    a.label("nf.ping")
    a.cmp(r13, qword["nf_pings"])
    a.jge("nf.summary")
    a.inc(r13)
    _copy_const(p, "nf_tx_buf", _echo_request)
    _copy(p, "nf_tx_buf", ETH_DST, "nf_peer_mac", 0, 6)
    _copy(p, "nf_tx_buf", ETH_SRC, "nf_mac", 0, 6)
    a.mov(eax, dword["nf_ip"])
    a.mov(dword[rip + "nf_tx_buf" + IP_SRC], eax)
    a.mov(eax, dword["nf_peer"])
    a.mov(dword[rip + "nf_tx_buf" + IP_DST], eax)
    a.mov(rax, r13)
    a.lea(rbx, ptr["nf_tx_buf"])
    _store_be16(p, rbx, ICMP_SEQ)
    a.lea(rsi, ptr[rip + "nf_tx_buf" + IP_VHL])
    a.mov(ecx, 20)
    a.call("nf_csum")
    _store_be16(p, rbx, IP_SUM)
    a.lea(rsi, ptr[rip + "nf_tx_buf" + ICMP_TYPE])
    a.mov(ecx, ECHO_LEN - ICMP_TYPE)
    a.call("nf_csum")
    _store_be16(p, rbx, ICMP_SUM)
    skip = _unless_quiet(p)
    p.print("netfront: echo request to ")
    a.mov(edi, dword["nf_peer"])
    a.call("nf_print_ip")
    p.print(" icmp_seq=")
    a.mov(rdi, r13)
    a.call("print_dec")
    p.print("\n")
    a.label(skip)
    a.mov(edi, ECHO_LEN)
    a.call("nf_send")
    a.inc(qword["nf_sent"])
    a.lea(rdi, ptr["nf_got_seq"])
    a.mov(rsi, r13)
    a.call("nf_wait")
    a.test(eax, eax)
    a.jne("nf.ping")
    p.print("netfront: no echo reply for icmp_seq=")
    a.mov(rdi, r13)
    a.call("print_dec")
    p.print("\n")
    a.jmp("nf.ping")

    # flood=N: the ARP request N times, as fast as the backend takes them (a port that
    # takes none keeps a bounded queue of them)
    a.label("nf.flood")
    a.mov(r13, rax)
    a.label("nf.flood.next")
    a.test(r13, r13)
    a.je("nf.summary")
    a.mov(edi, ARP_LEN)
    a.call("nf_send")
    a.inc(qword["nf_sent"])
    a.dec(r13)
    a.jmp("nf.flood.next")

    a.label("nf.summary")
    p.print("netfront: ")
    a.mov(rdi, qword["nf_sent"])
    a.call("print_dec")
    p.print(" sent, ")
    a.mov(rdi, qword["nf_received"])
    a.call("print_dec")
    p.print(" received\n")
    skip = f"nf.loud{next(_skips)}"
    a.cmp(dword["nf_quiet"], 0)
    a.je(skip)
    a.call("pvclock_read")
    a.sub(rax, qword["nf_t0"])
    a.mov(r13, rax)
    p.print("netfront: ")
    a.mov(rdi, qword["nf_sent"])
    a.call("print_dec")
    p.print(" round trips in ")
    a.mov(rdi, r13)
    a.call("print_dec")
    p.print(" ns\n")
    a.label(skip)
    _set_state(p, C.XenbusStateClosed)
    for reg in reversed(SAVED):
        a.pop(reg)
    a.xor(eax, eax)
    a.ret()

    _emit_badtx(p)
    _emit_routines(p)
    _emit_data(p)


_skips = iter(range(1 << 30))


def _unless_quiet(p: PVProgram) -> str:
    """(inline) Jump to the label returned (for the caller to place) if `quiet`."""
    skip = f"nf.quiet{next(_skips)}"
    p.a.cmp(dword["nf_quiet"], 0)
    p.a.jne(skip)
    return skip


def _set_state(p: PVProgram, state: int) -> None:
    a = p.a
    a.lea(rdi, ptr["front"])
    a.lea(rsi, ptr[p.string("state")])
    a.lea(rdx, ptr[p.string(str(state))])
    a.call("xs_write")


def _copy_const(p: PVProgram, dst: str, data: bytes) -> None:
    """(inline) data (kept in .data) to label dst."""
    consts = p.__dict__.setdefault("nf_consts", {})     # data -> its label
    label = consts.setdefault(data, f"nf_const{len(consts)}")
    a = p.a
    a.lea(rsi, ptr[label])
    a.lea(rdi, ptr[dst])
    a.mov(ecx, len(data))
    a.call("nf_memcpy")


def _emit_badtx(p: PVProgram) -> None:
    """nf.badtx: tx requests a backend must refuse, each status printed, then a producer
    index a thousand ahead, which must stop the backend serving the card; then it ends
    as the pinger does."""
    a = p.a
    a.label("nf.badtx")
    cases = [("an ungranted page", [(UNGRANTED_REF, 0, 60, 0)]),
             ("past the page", [(TX_BUF_REF, 4090, 60, 0)]),
             ("a runt", [(TX_BUF_REF, 0, 10, 0)]),
             ("pieces larger than the frame", [(TX_BUF_REF, 0, 20, C.NETTXF_more_data),
                                               (TX_BUF_REF, 100, 30, 0)])]
    p.print("netfront: refused:")
    for what, reqs in cases:
        for gref, offset, size, flags in reqs:
            a.mov(edi, gref)
            a.mov(esi, offset)
            a.mov(edx, size)
            a.mov(ecx, flags)
            a.call("nf_put_req")
        a.call("nf_push")
        a.mov(rbx, rax)
        p.print(f" {what} ")
        a.mov(rdi, rbx)
        a.call("print_sdec")
    p.print("\n")
    a.add(dword["nf_tx_ring"], BAD_AHEAD)     # req_prod, far ahead of any request
    p.hypercall("event_channel_op", C.EVTCHNOP_send, "nf_port")
    emit_wait_backend_closing(p, "nf.badtx")
    p.print(f"netfront: tx req_prod {BAD_AHEAD} ahead: backend state {C.XenbusStateClosing}\n")
    a.jmp("nf.summary")


def _emit_routines(p: PVProgram) -> None:
    a = p.a
    # nf_arp_request: "who has the peer?" from us, broadcast, into nf_tx_buf
    a.label("nf_arp_request")
    _copy_const(p, "nf_tx_buf", _arp_request)
    _copy(p, "nf_tx_buf", ETH_SRC, "nf_mac", 0, 6)
    _copy(p, "nf_tx_buf", ARP_SHA, "nf_mac", 0, 6)
    a.mov(eax, dword["nf_ip"])
    a.mov(dword[rip + "nf_tx_buf" + ARP_SPA], eax)
    a.mov(eax, dword["nf_peer"])
    a.mov(dword[rip + "nf_tx_buf" + ARP_TPA], eax)
    a.ret()

    # nf_memcpy(rdi = dst, rsi = src, ecx = bytes)
    a.label("nf_memcpy")
    a.test(ecx, ecx)
    a.je("nf_memcpy.done")
    a.mov(al, byte[rsi])
    a.mov(byte[rdi], al)
    a.inc(rsi)
    a.inc(rdi)
    a.dec(ecx)
    a.jmp("nf_memcpy")
    a.label("nf_memcpy.done")
    a.ret()

    # nf_csum(rsi = bytes, ecx = length, even) -> eax = the Internet checksum of them
    a.label("nf_csum")
    a.xor(edi, edi)
    a.label("nf_csum.word")
    a.test(ecx, ecx)
    a.je("nf_csum.fold")
    _load_be16(p, eax, rsi, 0)
    a.add(edi, eax)
    a.add(rsi, 2)
    a.sub(ecx, 2)
    a.jmp("nf_csum.word")
    a.label("nf_csum.fold")
    a.mov(eax, edi)
    a.shr(eax, 16)
    a.and_(edi, 0xFFFF)
    a.add(edi, eax)
    a.cmp(edi, 0xFFFF)
    a.ja("nf_csum.fold")
    a.mov(eax, edi)
    a.not_(eax)
    a.and_(eax, 0xFFFF)
    a.ret()

    # nf_cmdline_ip(rdi = "key=") -> rax = A.B.C.D as four bytes in memory order, or -1
    a.label("nf_cmdline_ip")
    a.call("cmdline_number")            # A; rsi after its digits
    a.cmp(rax, -1)
    a.je("nf_cmdline_ip.done")
    a.mov(byte["nf_scratch_ip"], al)
    for k in range(1, 4):
        a.cmp(byte[rsi], ord("."))
        a.jne("nf_cmdline_ip.bad")
        a.inc(rsi)
        a.call("atou")
        a.mov(byte[rip + "nf_scratch_ip" + k], al)
    a.mov(eax, dword["nf_scratch_ip"])
    a.ret()
    a.label("nf_cmdline_ip.bad")
    a.mov(rax, -1)
    a.label("nf_cmdline_ip.done")
    a.ret()

    # nf_hex_byte(rsi = two hex digits) -> al
    a.label("nf_hex_byte")
    a.xor(eax, eax)
    for i in range(2):
        a.movzx(ecx, byte[rsi + i])
        a.or_(ecx, 0x20)                # lower case
        a.sub(ecx, ord("0"))
        a.cmp(ecx, 9)
        a.jbe(f"nf_hex_byte.{i}")
        a.sub(ecx, ord("a") - ord("0") - 10)
        a.label(f"nf_hex_byte.{i}")
        a.shl(eax, 4)
        a.or_(eax, ecx)
    a.ret()

    # nf_print_ip(edi = address, memory order): A.B.C.D
    a.label("nf_print_ip")
    a.push(rbx)
    a.mov(ebx, edi)
    for k in range(4):
        if k:
            p.print(".")
        a.movzx(edi, bl)
        a.call("print_dec")
        a.shr(ebx, 8)
    a.pop(rbx)
    a.ret()

    # nf_print_peer_mac: the peer's MAC, aa:bb:cc:dd:ee:ff
    a.label("nf_print_peer_mac")
    a.lea(rsi, ptr["nf_hex_digits"])
    for i in range(6):
        a.movzx(eax, byte[rip + "nf_peer_mac" + i])
        a.mov(ecx, eax)
        a.shr(ecx, 4)
        a.mov(dl, byte[rsi + rcx])
        a.mov(byte[rip + "nf_mac_text" + 3 * i], dl)
        a.and_(eax, 15)
        a.mov(dl, byte[rsi + rax])
        a.mov(byte[rip + "nf_mac_text" + 3 * i + 1], dl)
    a.lea(rdi, ptr["nf_mac_text"])
    a.call("print_cstr")
    a.ret()

    # nf_send(edi = length): the frame in nf_tx_buf as one tx request; waits until the
    # backend answered it (the page is then free again)
    a.label("nf_send")
    a.mov(edx, edi)
    a.mov(edi, TX_BUF_REF)
    a.xor(esi, esi)
    a.xor(ecx, ecx)
    a.call("nf_put_req")
    a.jmp("nf_push")

    # nf_put_req(edi = gref, esi = offset, edx = size, ecx = flags): a tx request at the
    # private producer (its id: its index), not yet published
    a.label("nf_put_req")
    a.mov(eax, dword["nf_tx_prod"])
    a.mov(r8d, eax)
    a.and_(r8d, C.NET_TX_RING_SIZE - 1)
    a.imul(r8d, r8d, TX_SLOT)
    a.lea(r9, ptr[rip + "nf_tx_ring" + RING_HEADER])
    a.add(r9, r8)
    a.mov(dword[r9], edi)               # gref
    a.mov(word[r9 + 4], si)             # offset
    a.mov(word[r9 + 6], cx)             # flags
    a.mov(word[r9 + 8], ax)             # id
    a.mov(word[r9 + 10], dx)            # size
    a.inc(eax)
    a.mov(dword["nf_tx_prod"], eax)
    a.ret()

    # nf_push -> rax = the status of the first request put since the last push: publish
    # them, notify, wait until all are answered (the tx page is free again then)
    a.label("nf_push")
    a.mov(eax, dword["nf_tx_ring"])     # req_prod: the first new request's index
    a.mov(dword["nf_tx_first"], eax)
    a.mov(eax, dword["nf_tx_prod"])
    a.mov(dword["nf_tx_ring"], eax)     # req_prod, after the requests
    p.hypercall("event_channel_op", C.EVTCHNOP_send, "nf_port")
    a.label("nf_push.wait")             # (nf_rx sends: it is not called from here)
    a.mov(eax, dword[rip + "nf_tx_ring" + 8])   # rsp_prod
    a.cmp(eax, dword["nf_tx_prod"])
    a.je("nf_push.done")
    p.hypercall("sched_op", C.SCHEDOP_yield, 0)
    a.jmp("nf_push.wait")
    a.label("nf_push.done")
    a.mov(eax, dword["nf_tx_first"])
    a.and_(eax, C.NET_TX_RING_SIZE - 1)
    a.imul(eax, eax, TX_SLOT)
    a.lea(rdx, ptr[rip + "nf_tx_ring" + RING_HEADER])
    a.movsx(rax, word[rdx + rax + 2])   # status
    a.ret()

    # nf_wait(rdi = a dword variable, rsi = value) -> eax = 1 once the variable holds the
    # value (frames handled meanwhile), 0 once nf_wait_ns have passed
    a.label("nf_wait")
    a.push(rbx)
    a.push(r14)
    a.push(r15)
    a.mov(r14, rdi)
    a.mov(r15, rsi)
    a.call("pvclock_read")
    a.add(rax, qword["nf_wait_ns"])
    a.mov(rbx, rax)                     # the deadline
    a.label("nf_wait.poll")
    a.mov(eax, dword[r14])
    a.cmp(rax, r15)
    a.je("nf_wait.yes")
    a.call("nf_rx")
    a.test(eax, eax)
    a.jne("nf_wait.poll")
    a.call("pvclock_read")
    a.cmp(rax, rbx)
    a.jae("nf_wait.no")
    p.hypercall("sched_op", C.SCHEDOP_yield, 0)
    a.jmp("nf_wait.poll")
    a.label("nf_wait.yes")
    a.mov(eax, 1)
    a.jmp("nf_wait.out")
    a.label("nf_wait.no")
    a.xor(eax, eax)
    a.label("nf_wait.out")
    a.pop(r15)
    a.pop(r14)
    a.pop(rbx)
    a.ret()

    _emit_rx(p)


def _emit_rx(p: PVProgram) -> None:
    """nf_rx() -> eax = 1 if it took a frame off the rx ring (and answered it: ARP
    request for us, echo request to us; or noted an ARP reply from the peer, an echo
    reply to us), 0 if the ring had none. The page goes back on the ring."""
    a = p.a
    a.label("nf_rx")
    a.mov(eax, dword[rip + "nf_rx_ring" + 8])   # rsp_prod
    a.cmp(eax, dword["nf_rx_cons"])
    a.jne("nf_rx.take")
    a.xor(eax, eax)
    a.ret()
    a.label("nf_rx.take")
    a.push(rbx)
    a.push(r12)
    a.mov(eax, dword["nf_rx_cons"])
    a.and_(eax, C.NET_RX_RING_SIZE - 1)
    a.lea(rdx, ptr[rip + "nf_rx_ring" + RING_HEADER])
    a.movzx(ecx, word[rdx + rax * 8])           # id: our page
    a.and_(ecx, RX_BUFFERS - 1)
    a.movsx(r12, word[rdx + rax * 8 + 6])       # status: the frame's length
    a.mov(dword["nf_rx_id"], ecx)
    a.inc(dword["nf_rx_cons"])
    a.shl(ecx, 12)
    a.lea(rbx, ptr["nf_rx_bufs"])
    a.add(rbx, rcx)                             # rbx: the frame
    a.cmp(r12, ARP_LEN)
    a.jl("nf_rx.repost")
    a.cmp(word[rbx + ETH_TYPE], 0x0608)         # ARP (big-endian 0x0806)
    a.je("nf_rx.arp")
    a.cmp(word[rbx + ETH_TYPE], 0x0008)         # IPv4
    a.jne("nf_rx.repost")
    a.cmp(byte[rbx + IP_VHL], 0x45)
    a.jne("nf_rx.repost")
    a.cmp(byte[rbx + IP_PROTO], 1)              # ICMP
    a.jne("nf_rx.repost")
    a.mov(eax, dword[rbx + IP_DST])
    a.cmp(eax, dword["nf_ip"])
    a.jne("nf_rx.repost")
    # both checksums must hold, as a stack checks them: IP's header, ICMP's message
    # (an odd length is not summed here: dropped)
    a.lea(rsi, ptr[rbx + IP_VHL])
    a.mov(ecx, 20)
    a.call("nf_csum")
    a.test(eax, eax)
    a.jne("nf_rx.bad_sum")
    _load_be16(p, ecx, rbx, IP_LEN)
    a.sub(ecx, 20)
    a.test(ecx, 1)
    a.jne("nf_rx.bad_sum")
    a.lea(rsi, ptr[rbx + ICMP_TYPE])
    a.call("nf_csum")
    a.test(eax, eax)
    a.je("nf_rx.sums_hold")
    a.label("nf_rx.bad_sum")
    p.print("netfront: a bad checksum, dropped\n")
    a.jmp("nf_rx.repost")
    a.label("nf_rx.sums_hold")
    a.cmp(byte[rbx + ICMP_TYPE], 8)
    a.je("nf_rx.echo_request")
    a.cmp(byte[rbx + ICMP_TYPE], 0)
    a.jne("nf_rx.repost")
    # an echo reply: ours if it carries our identifier
    _load_be16(p, eax, rbx, ICMP_ID_AT)
    a.cmp(eax, ICMP_ID)
    a.jne("nf_rx.repost")
    _load_be16(p, eax, rbx, ICMP_SEQ)
    a.mov(dword["nf_got_seq"], eax)
    a.inc(qword["nf_received"])
    skip = _unless_quiet(p)
    p.print("netfront: echo reply from ")
    a.mov(edi, dword[rbx + IP_SRC])
    a.call("nf_print_ip")
    p.print(" icmp_seq=")
    a.mov(edi, dword["nf_got_seq"])
    a.call("print_dec")
    p.print("\n")
    a.label(skip)
    a.jmp("nf_rx.repost")

    a.label("nf_rx.echo_request")               # the same frame back, turned around
    a.mov(rsi, rbx)
    a.lea(rdi, ptr["nf_tx_buf"])
    a.mov(rcx, r12)
    a.call("nf_memcpy")
    _copy(p, "nf_tx_buf", ETH_DST, rbx, ETH_SRC, 6)
    _copy(p, "nf_tx_buf", ETH_SRC, "nf_mac", 0, 6)
    a.mov(eax, dword[rbx + IP_SRC])
    a.mov(dword[rip + "nf_tx_buf" + IP_DST], eax)
    a.mov(eax, dword[rbx + IP_DST])
    a.mov(dword[rip + "nf_tx_buf" + IP_SRC], eax)
    a.mov(byte[rip + "nf_tx_buf" + ICMP_TYPE], 0)
    # the type's byte went from 8 to 0: the checksum grows by 0x0800 (one's complement)
    a.push(rbx)
    a.lea(rbx, ptr["nf_tx_buf"])
    _load_be16(p, eax, rbx, ICMP_SUM)
    a.add(eax, 0x0800)
    a.mov(ecx, eax)
    a.shr(ecx, 16)
    a.add(eax, ecx)
    _store_be16(p, rbx, ICMP_SUM)
    a.pop(rbx)
    skip = _unless_quiet(p)
    p.print("netfront: echo request from ")
    a.mov(edi, dword[rbx + IP_SRC])
    a.call("nf_print_ip")
    p.print(" icmp_seq=")
    _load_be16(p, edi, rbx, ICMP_SEQ)
    a.call("print_dec")
    p.print(", replied\n")
    a.label(skip)
    a.mov(rdi, r12)
    a.call("nf_send")
    a.jmp("nf_rx.repost")

    a.label("nf_rx.arp")
    a.mov(eax, dword[rbx + ARP_TPA])
    a.cmp(eax, dword["nf_ip"])
    a.jne("nf_rx.repost")
    a.cmp(word[rbx + ARP_OP], 0x0100)           # request
    a.je("nf_rx.arp_request")
    a.cmp(word[rbx + ARP_OP], 0x0200)           # reply
    a.jne("nf_rx.repost")
    a.mov(eax, dword[rbx + ARP_SPA])
    a.cmp(eax, dword["nf_peer"])
    a.jne("nf_rx.repost")
    _copy(p, "nf_peer_mac", 0, rbx, ARP_SHA, 6)
    a.mov(dword["nf_peer_known"], 1)
    a.jmp("nf_rx.repost")
    a.label("nf_rx.arp_request")
    _copy_const(p, "nf_tx_buf", _arp_request)
    a.mov(byte[rip + "nf_tx_buf" + ARP_OP + 1], 2)
    _copy(p, "nf_tx_buf", ETH_DST, rbx, ARP_SHA, 6)
    _copy(p, "nf_tx_buf", ETH_SRC, "nf_mac", 0, 6)
    _copy(p, "nf_tx_buf", ARP_SHA, "nf_mac", 0, 6)
    a.mov(eax, dword["nf_ip"])
    a.mov(dword[rip + "nf_tx_buf" + ARP_SPA], eax)
    _copy(p, "nf_tx_buf", ARP_THA, rbx, ARP_SHA, 6)
    a.mov(eax, dword[rbx + ARP_SPA])
    a.mov(dword[rip + "nf_tx_buf" + ARP_TPA], eax)
    p.print("netfront: arp request from ")
    a.mov(edi, dword[rbx + ARP_SPA])
    a.call("nf_print_ip")
    p.print(", replied\n")
    a.mov(edi, ARP_LEN)
    a.call("nf_send")

    a.label("nf_rx.repost")                     # the page back on the ring
    a.mov(eax, dword["nf_rx_ring"])             # req_prod
    a.mov(ecx, eax)
    a.and_(ecx, C.NET_RX_RING_SIZE - 1)
    a.lea(rdx, ptr[rip + "nf_rx_ring" + RING_HEADER])
    a.mov(esi, dword["nf_rx_id"])
    a.mov(word[rdx + rcx * 8], si)
    a.add(esi, RX_BUF_REF)
    a.mov(dword[rdx + rcx * 8 + 4], esi)
    a.inc(eax)
    a.mov(dword["nf_rx_ring"], eax)
    p.hypercall("event_channel_op", C.EVTCHNOP_send, "nf_port")
    a.pop(r12)
    a.pop(rbx)
    a.mov(eax, 1)
    a.ret()


def _emit_data(p: PVProgram) -> None:
    a = p.a
    a.section(".data")
    a.align(8)
    for data, label in p.__dict__.get("nf_consts", {}).items():
        a.label(label)
        a.db(data)
    a.align(8)
    for label in ("nf_port", "nf_ip", "nf_peer", "nf_peer_known", "nf_got_seq", "nf_rx_cons",
                  "nf_rx_id", "nf_scratch_ip", "nf_quiet", "nf_tx_prod", "nf_tx_first"):
        a.label(label)
        a.dd(0)
    for label in ("nf_pings", "nf_sent", "nf_received", "nf_wait_ns", "nf_t0"):
        a.label(label)
        a.dq(0)
    a.label("nf_mac")
    a.db(bytes(8))
    a.label("nf_peer_mac")
    a.db(bytes(8))
    a.label("nf_hex_digits")
    a.db(b"0123456789abcdef")
    a.label("nf_mac_text")
    a.db(b"xx:xx:xx:xx:xx:xx\0")
    a.section(".bss")
    a.align(4096)
    a.label("nf_tx_ring")
    a.reserve(4096)
    a.label("nf_rx_ring")
    a.reserve(4096)
    a.label("nf_tx_buf")
    a.reserve(4096)
    a.label("nf_rx_bufs")
    a.reserve(RX_BUFFERS * 4096)
    a.section(".text")
