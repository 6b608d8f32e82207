"""A PV guest that speaks xenstore's wire protocol on its ring, driven by a script.

The guest finds its ring and port in start_info (store_mfn, store_evtchn), as a Xen domU
does, and runs a script the test writes in Python: send these bytes as requests, read N
whole messages (replies and watch events) into a buffer, tell the host to act ("sync" on
the console), poke a word of the ring page (to break its indexes, or ask to reconnect),
or copy one into the output (peek). The host side reads the buffer back after the guest
powered off and checks every reply byte for byte; the guest judges nothing itself, so
one small program covers every case.

    script = Script()
    script.send(msg(C.XS_READ, b"name\\0"))
    script.recv(1)
    image = xenstore_guest(script)
    ... run it; replies(dom, console) -> [(type, req_id, tx_id, payload), ...]
"""
from __future__ import annotations

import struct

from abi import C, offsetof

from .asm import (al, byte, dword, eax, ecx, edx, ptr, qword, r12, r13, r14, r15, rax, rbx, rcx,
                  rdi, rdx, rsi)
from .runtime import PVProgram

SEND, RECV, SYNC, POKE, PEEK, END = 1, 2, 3, 4, 5, 0
PEEKED = 0xFFFFFFFF                 # the type of the record a peek leaves in the output
OUT_BYTES = 64 * 1024               # where the replies go; a script reads at most this
REQ = offsetof("xenstore_domain_interface", "req")
RSP = offsetof("xenstore_domain_interface", "rsp")
REQ_CONS = offsetof("xenstore_domain_interface", "req_cons")
REQ_PROD = offsetof("xenstore_domain_interface", "req_prod")
RSP_CONS = offsetof("xenstore_domain_interface", "rsp_cons")
RSP_PROD = offsetof("xenstore_domain_interface", "rsp_prod")
RING = C.XENSTORE_RING_SIZE


def msg(kind: int, payload: bytes, req_id: int = 0, tx: int = 0,
        length: int | None = None) -> bytes:
    """One wire message: header (`length` in place of the true one if given) and payload."""
    length = len(payload) if length is None else length
    return struct.pack("<IIII", kind, req_id, tx, length) + payload


class Script:
    """What the guest does, in order."""

    def __init__(self):
        self.data = bytearray()

    def send(self, data: bytes) -> "Script":
        self.data += struct.pack("<II", SEND, len(data)) + data
        return self

    def recv(self, count: int) -> "Script":
        self.data += struct.pack("<II", RECV, count)
        return self

    def sync(self) -> "Script":
        """Print "sync" on the console: the host acts, the script goes on at once."""
        self.data += struct.pack("<II", SYNC, 0)
        return self

    def peek(self, field: str) -> "Script":
        """Append a u32 field of the ring page to the output, as a message of type PEEKED
        whose req_id is the value (notifications are answered before send returns)."""
        self.data += struct.pack("<II", PEEK, offsetof("xenstore_domain_interface", field))
        return self

    def poke(self, field: str, value: int) -> "Script":
        """Write a u32 field of the ring page, then notify the store."""
        self.data += struct.pack("<III", POKE, offsetof("xenstore_domain_interface", field), value)
        return self


def xenstore_guest(script: Script) -> bytes:
    p = PVProgram()
    a = p.a
    a.mov(rax, qword["start_info_ptr"])
    a.mov(r12, qword[rax + offsetof("start_info", "store_mfn")])
    a.shl(r12, 12)                      # VIRT_BASE 0: the frame's address is its own
    a.mov(eax, dword[rax + offsetof("start_info", "store_evtchn")])
    a.mov(r13, rax)
    a.mov(dword["send_arg"], eax)       # EVTCHNOP_send's argument: the store's port
    p.print("out ")
    a.lea(rdi, ptr["xs_out"])
    a.call("print_hex")
    p.print("\n")
    a.lea(r14, ptr["xs_script"])
    a.lea(r15, ptr["xs_out"])

    a.label("step")
    a.mov(eax, dword[r14])
    a.mov(ecx, dword[r14 + 4])
    a.add(r14, 8)
    a.cmp(eax, SEND)
    a.je("do_send")
    a.cmp(eax, RECV)
    a.je("do_recv")
    a.cmp(eax, SYNC)
    a.je("do_sync")
    a.cmp(eax, POKE)
    a.je("do_poke")
    a.cmp(eax, PEEK)
    a.je("do_peek")
    p.print("done\n")
    a.xor(eax, eax)
    a.ret()

    # send: rcx bytes from the script into req, then one notification
    a.label("do_send")
    a.label("do_send.loop")
    a.test(rcx, rcx)
    a.je("do_send.done")
    a.mov(al, byte[r14])
    a.call("put_byte")
    a.inc(r14)
    a.dec(rcx)
    a.jmp("do_send.loop")
    a.label("do_send.done")
    a.call("notify")
    a.jmp("step")

    # recv: rcx whole messages from rsp, appended at r15
    a.label("do_recv")
    a.mov(rbx, rcx)
    a.label("do_recv.msg")
    a.test(rbx, rbx)
    a.je("step")
    a.mov(rdi, r15)                     # the header's start
    a.mov(ecx, 16)
    a.label("do_recv.hdr")
    a.call("get_byte")
    a.mov(byte[r15], al)
    a.inc(r15)
    a.dec(ecx)
    a.jne("do_recv.hdr")
    a.mov(ecx, dword[rdi + 12])         # its payload's length
    a.label("do_recv.body")
    a.test(ecx, ecx)
    a.je("do_recv.next")
    a.call("get_byte")
    a.mov(byte[r15], al)
    a.inc(r15)
    a.dec(ecx)
    a.jmp("do_recv.body")
    a.label("do_recv.next")
    a.call("notify")                    # we made room: the store may have more queued
    a.dec(rbx)
    a.jmp("do_recv.msg")

    a.label("do_sync")
    p.print("sync\n")
    a.jmp("step")

    # poke: rcx = offset in the ring page, the next u32 = value
    a.label("do_poke")
    a.mov(eax, dword[r14])
    a.add(r14, 4)
    a.mov(dword[r12 + rcx], eax)
    a.call("notify")
    a.jmp("step")

    # peek: rcx = offset in the ring page; a 16-byte record {PEEKED, value, 0, 0}
    a.label("do_peek")
    a.mov(dword[r15], PEEKED)
    a.mov(eax, dword[r12 + rcx])
    a.mov(dword[r15 + 4], eax)
    a.mov(dword[r15 + 8], 0)
    a.mov(dword[r15 + 12], 0)
    a.add(r15, 16)
    a.jmp("step")

    # put_byte(al): wait for room in req, store it, publish it
    a.label("put_byte")
    a.push(rcx)
    a.label("put_byte.wait")
    a.mov(edx, dword[r12 + REQ_PROD])
    a.mov(ecx, edx)
    a.sub(ecx, dword[r12 + REQ_CONS])
    a.cmp(ecx, RING)
    a.jb("put_byte.room")
    a.call("notify")                    # full: the store takes it, then go on
    a.call("yield_")
    a.jmp("put_byte.wait")
    a.label("put_byte.room")
    a.mov(ecx, edx)
    a.and_(ecx, RING - 1)
    a.mov(byte[r12 + rcx + REQ], al)
    a.inc(edx)
    a.mov(dword[r12 + REQ_PROD], edx)   # x86 keeps stores in order: data, then index
    a.pop(rcx)
    a.ret()

    # get_byte -> al: wait for a byte in rsp, take it
    a.label("get_byte")
    a.push(rcx)
    a.label("get_byte.wait")
    a.mov(edx, dword[r12 + RSP_CONS])
    a.cmp(edx, dword[r12 + RSP_PROD])
    a.jne("get_byte.there")
    a.call("notify")
    a.call("yield_")
    a.jmp("get_byte.wait")
    a.label("get_byte.there")
    a.mov(ecx, edx)
    a.and_(ecx, RING - 1)
    a.mov(al, byte[r12 + rcx + RSP])
    a.inc(edx)
    a.mov(dword[r12 + RSP_CONS], edx)
    a.pop(rcx)
    a.ret()

    # notify / yield_: the hypercalls, keeping every register the loops use
    for name, emit in (
            ("notify", lambda: p.hypercall("event_channel_op", C.EVTCHNOP_send, "send_arg")),
            ("yield_", lambda: p.hypercall("sched_op", C.SCHEDOP_yield, 0))):
        a.label(name)
        for reg in (rax, rcx, rdx, rsi, rdi):
            a.push(reg)
        emit()
        for reg in (rdi, rsi, rdx, rcx, rax):
            a.pop(reg)
        a.ret()

    a.section(".data")
    a.label("send_arg")
    a.dd(0)
    a.section(".rodata")
    a.label("xs_script")
    a.db(bytes(script.data) + struct.pack("<II", END, 0))
    a.section(".bss")
    a.align(16)
    a.label("xs_out")
    a.reserve(OUT_BYTES)
    a.section(".text")
    return p.elf()
