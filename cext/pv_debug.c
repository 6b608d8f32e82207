/*
 * pv_debug.c - the debug registers of Xen's PV model as the CPU acts on them (SDM vol. 3
 * ch. 18), for engines whose CPU does not: which breakpoints an access or an instruction
 * hits, Xen's pv_inject_DB, and the single-step trapless takes on a CPU that runs the
 * guest natively but loads none of its debug registers (this KVM-PVM host refuses
 * KVM_SET_DEBUGREGS and KVM_SET_GUEST_DEBUG).
 *
 * Stepping: while the guest's DR7 enables a code or data breakpoint, the engine runs the
 * vCPU with the real RFLAGS.TF set and so gets a #DB after every instruction. Before
 * each step, pv_step_resume decodes the instruction about to run and works out which
 * data breakpoints its memory accesses will hit (a write breakpoint, R/W 01, on writes;
 * R/W 11 on reads and writes; LEN 1, 2, 4 or 8 bytes, aligned down), and raises an
 * instruction breakpoint at rip as a fault (unless RFLAGS.RF lets it run once). When the
 * step's #DB arrives, pv_step_trap delivers the data hits, and DR6.BS if the guest
 * itself had TF set, as one #DB trap after the instruction. The guest never sees
 * trapless's TF: every way its rflags leave the CPU (the frame of an exception, r11 of
 * `syscall`, a `pushf`) is put back to the guest's own TF, which `popf` and `iretq` change.
 * A `mov %ss` holds the #DB of the instruction after it (the CPU's shadow, which this
 * host keeps for TF too): the step covers both. A #DB in the hypervisor's own context is
 * dropped, as Xen's do_debug drops it (XSA-260): a `syscall` under TF gives none.
 */
#include <stddef.h>
#include <string.h>

#include "hv.h"
#include "bt.h"                         /* the x86-64 instruction decoder (bt_decode.c) */

#define RFLAGS_TF   (1ULL << 8)
#define RFLAGS_RF   (1ULL << 16)
#define DR6_BS      (1u << 14)
#define DR7_RW_EXEC 0
#define DR7_RW_WRITE 1
#define DR7_RW_IO   2

/* ---- the breakpoints DR7 arms ---- */

static int dr7_enabled(uint64_t dr7, int i)
{
    return (dr7 >> (2 * i)) & 3;
}

static unsigned dr7_rw(uint64_t dr7, int i)
{
    return (dr7 >> (16 + 4 * i)) & 3;
}

/* LEN encodings 00, 01, 10, 11: 1, 2, 8, 4 bytes */
static uint64_t dr7_len(uint64_t dr7, int i)
{
    static const uint8_t bytes[4] = { 1, 2, 8, 4 };
    return bytes[(dr7 >> (18 + 4 * i)) & 3];
}

int pv_debug_armed(const struct pv_vcpu *p, int data)
{
    for (int i = 0; i < 4; i++) {
        unsigned rw = dr7_rw(p->dr[7], i);
        if (dr7_enabled(p->dr[7], i) && rw != DR7_RW_IO && (rw != DR7_RW_EXEC) == data)
            return 1;
    }
    return 0;
}

uint32_t pv_debug_data_hits(const struct pv_vcpu *p, uint64_t va, uint64_t size, int write)
{
    uint32_t hits = 0;

    for (int i = 0; i < 4; i++) {
        unsigned rw = dr7_rw(p->dr[7], i);
        uint64_t len = dr7_len(p->dr[7], i), start = p->dr[i] & ~(len - 1);
        if (!dr7_enabled(p->dr[7], i) || rw == DR7_RW_EXEC || rw == DR7_RW_IO ||
            (rw == DR7_RW_WRITE && !write))
            continue;
        if (va < start + len && va + size > start)
            hits |= 1u << i;
    }
    return hits;
}

uint32_t pv_debug_exec_hits(const struct pv_vcpu *p, uint64_t rip)
{
    uint32_t hits = 0;

    for (int i = 0; i < 4; i++)
        if (dr7_enabled(p->dr[7], i) && dr7_rw(p->dr[7], i) == DR7_RW_EXEC && p->dr[i] == rip)
            hits |= 1u << i;
    return hits;
}

/* Xen's pv_inject_DB: B0-B3 are the CPU's for this #DB alone, BS and BD stay until the
 * guest clears them; the guest's handler reads the result with get_debugreg(6). */
int pv_inject_db(struct hv_vcpu *v, struct pv_regs *r, uint32_t dr6_bits, struct hv_stop *stop)
{
    v->pv.dr[6] = (v->pv.dr[6] & ~0xfULL) | dr6_bits;
    return pv_exception(v, r, 1, 0, 0, stop);
}

/* ---- the memory an instruction touches ---- */

enum { ACC_R = 1, ACC_W = 2, ACC_RW = 3 };

struct access {
    uint64_t va;
    uint32_t size;
    int      how;                       /* ACC_R, ACC_W, ACC_RW */
};

/* pv_regs by register number in an encoding */
static uint64_t reg(const struct pv_regs *r, int n)
{
    return *(const uint64_t *)((const uint8_t *)r + pv_gpr_offset(n));
}

/* An fs: or gs: override adds its base; in 64-bit mode the others add nothing. */
static uint64_t seg_base(const struct pv_regs *r, const struct bt_insn *in)
{
    return in->seg == 0x64 ? r->fs_base : in->seg == 0x65 ? r->gs_base : 0;
}

/* The linear address of the ModRM memory operand; next_rip for rip-relative ones
 * (32-bit code: 32-bit addresses). */
static uint64_t modrm_address(const struct pv_regs *r, const struct bt_insn *in, uint64_t next_rip,
                              int code32)
{
    int mod = in->modrm >> 6, rm = in->modrm & 7;
    uint64_t ea = (uint64_t)(int64_t)in->disp;

    if (in->disp_at_end_rel) {
        ea += next_rip;
    } else if (rm == 4) {
        int base = (in->sib & 7) | (in->rex & 1) << 3, index = ((in->sib >> 3) & 7) | (in->rex & 2) << 2;
        if (index != 4)
            ea += reg(r, index) << (in->sib >> 6);
        if (!(mod == 0 && (in->sib & 7) == 5))
            ea += reg(r, base);
    } else {
        ea += reg(r, rm | (in->rex & 1) << 3);
    }
    if (in->addr32 || code32)
        ea = (uint32_t)ea;
    return seg_base(r, in) + ea;
}

/* How an x87 escape (D8-DF) with a memory operand uses it: *size bytes. */
static int x87_operand(uint8_t op, int reg_field, uint32_t *size)
{
    static const uint8_t sizes[8] = { 4, 4, 4, 4, 8, 8, 2, 2 };    /* by opcode & 7 */
    *size = sizes[op & 7];
    if (!(op & 1))
        return ACC_R;                   /* D8 DA DC DE: arithmetic with memory */
    if (reg_field == 4 || reg_field == 6) {
        *size = op == 0xdf ? 10 : op == 0xdb ? 0 : op == 0xdd ? 108 : 28;  /* fbld/fbstp, env, state */
        return *size ? (reg_field == 4 ? ACC_R : ACC_W) : 0;
    }
    if (op == 0xdb && (reg_field == 5 || reg_field == 7))
        *size = 10;                     /* an 80-bit real */
    if (op == 0xdf && (reg_field == 5 || reg_field == 7))
        *size = 8;                      /* a 64-bit integer */
    if ((op == 0xd9 && (reg_field == 5 || reg_field == 7)) || (op == 0xdd && reg_field == 7))
        *size = 2;                      /* the control word, the status word */
    return reg_field == 0 || reg_field == 5 ? ACC_R : ACC_W;
}

/* How a one-byte-map instruction uses its ModRM memory operand (0: not at all). */
static int map0_operand(const struct bt_insn *in, uint32_t *size)
{
    uint8_t op = in->opcode;
    int r = (in->modrm >> 3) & 7, byte = !(op & 1);

    *size = in->opsize;
    if (op < 0x40) {                    /* add or adc sbb and sub xor cmp */
        if ((op & 7) > 3)
            return 0;
        if (byte)
            *size = 1;
        return (op & 2) || (op >> 3) == 7 ? ACC_R : ACC_RW;
    }
    if (op >= 0xd8 && op <= 0xdf)
        return x87_operand(op, r, size);
    switch (op) {
    case 0x63: *size = 4; return ACC_R;                 /* movsxd */
    case 0x69: case 0x6b: return ACC_R;                 /* imul r, r/m, imm */
    case 0x80: case 0x81: case 0x83:
        if (op == 0x80)
            *size = 1;
        return r == 7 ? ACC_R : ACC_RW;                 /* cmp only reads */
    case 0x84: case 0x85: case 0x8a: case 0x8b:         /* test, mov r, r/m */
        if (!(op & 1))
            *size = 1;
        return ACC_R;
    case 0x86: case 0x87:                               /* xchg */
        if (byte)
            *size = 1;
        return ACC_RW;
    case 0x88: case 0x89:                               /* mov r/m, r */
        if (byte)
            *size = 1;
        return ACC_W;
    case 0x8c: *size = 2; return ACC_W;                 /* mov r/m, sreg */
    case 0x8e: *size = 2; return ACC_R;                 /* mov sreg, r/m */
    case 0x8f: *size = in->opsize == 2 ? 2 : 8; return ACC_W;      /* pop r/m */
    case 0xc0: case 0xd0: case 0xd2: *size = 1; return ACC_RW;     /* shifts, rotates */
    case 0xc1: case 0xd1: case 0xd3: return ACC_RW;
    case 0xc6: *size = 1; return ACC_W;                 /* mov r/m, imm */
    case 0xc7: return ACC_W;
    case 0xf6: case 0xf7:                               /* test, not, neg, mul, div */
        if (byte)
            *size = 1;
        return r == 2 || r == 3 ? ACC_RW : ACC_R;
    case 0xfe: *size = 1; return r < 2 ? ACC_RW : 0;    /* inc, dec */
    case 0xff:
        if (r < 2)
            return ACC_RW;
        if (r == 2 || r == 4 || r == 6) {               /* call, jmp, push */
            *size = in->opsize == 2 && r == 6 ? 2 : 8;
            return ACC_R;
        }
        *size = (in->opsize == 2 ? 2 : 4) + 2;          /* far call, jmp: m16:16/32 */
        return r == 7 ? 0 : ACC_R;
    }
    return 0;                           /* lea (8d), and the forms without memory */
}

/* ... and an 0F-map (or VEX) one: integer instructions exactly, SSE moves by their
 * direction, any other SIMD operand as a 16-byte read. */
static int map1_operand(const struct bt_insn *in, uint32_t *size)
{
    uint8_t op = in->opcode;
    int r = (in->modrm >> 3) & 7;
    uint8_t pfx = in->simd_prefix;

    *size = in->opsize;
    if (in->map != 1) {
        *size = 16;
        return ACC_R;
    }
    if (op >= 0x40 && op <= 0x4f)
        return ACC_R;                                   /* cmovcc */
    if (op >= 0x90 && op <= 0x9f) {
        *size = 1;
        return ACC_W;                                   /* setcc */
    }
    switch (op) {
    case 0x00: *size = 2; return r < 2 ? ACC_W : ACC_R;    /* sldt str | lldt ltr verr verw */
    case 0x01: *size = 10; return r < 2 ? ACC_W : r < 4 ? ACC_R : r == 4 ? (*size = 2, ACC_W) :
                                  r == 6 ? (*size = 2, ACC_R) : 0;  /* sgdt sidt lgdt lidt smsw lmsw */
    case 0x0d: case 0x18: case 0x1f: return 0;          /* prefetch, hint nop */
    case 0x10: case 0x11:                               /* movups movss movsd movupd */
        *size = pfx == 0xf3 ? 4 : pfx == 0xf2 ? 8 : 16;
        return op == 0x10 ? ACC_R : ACC_W;
    case 0x12: case 0x16: *size = 8; return ACC_R;      /* movlps movhps */
    case 0x13: case 0x17: *size = 8; return ACC_W;
    case 0x28: *size = 16; return ACC_R;                /* movaps */
    case 0x29: case 0x2b: *size = 16; return ACC_W;     /* movaps, movntps */
    case 0x6e: return ACC_R;                            /* movd/movq from r/m */
    case 0x7e:
        if (pfx == 0xf3) {
            *size = 8;                                  /* movq xmm, m64 */
            return ACC_R;
        }
        return ACC_W;                                   /* movd/movq to r/m */
    case 0x6f: *size = pfx ? 16 : 8; return ACC_R;      /* movq mm / movdqa movdqu */
    case 0x7f: *size = pfx ? 16 : 8; return ACC_W;
    case 0xd6: *size = 8; return ACC_W;                 /* movq m64, xmm */
    case 0xe7: *size = pfx ? 16 : 8; return ACC_W;      /* movntq, movntdq */
    case 0xc3: return ACC_W;                            /* movnti */
    case 0xa3: return ACC_R;                            /* bt */
    case 0xab: case 0xb3: case 0xbb: return ACC_RW;     /* bts btr btc */
    case 0xba: return r == 4 ? ACC_R : r > 4 ? ACC_RW : 0;
    case 0xa4: case 0xa5: case 0xac: case 0xad: return ACC_RW;     /* shld shrd */
    case 0xaf: return ACC_R;                            /* imul */
    case 0xb0: case 0xc0: *size = 1; return ACC_RW;     /* cmpxchg, xadd */
    case 0xb1: case 0xc1: return ACC_RW;
    case 0xb6: case 0xbe: *size = 1; return ACC_R;      /* movzx, movsx */
    case 0xb7: case 0xbf: *size = 2; return ACC_R;
    case 0xbc: case 0xbd: case 0xb8: return ACC_R;      /* bsf bsr tzcnt lzcnt popcnt */
    case 0xc7: *size = in->opsize == 8 ? 16 : 8; return r == 1 ? ACC_RW : 0;   /* cmpxchg8b/16b */
    case 0xae:
        switch (r) {
        case 0: *size = 512; return ACC_W;              /* fxsave */
        case 1: *size = 512; return ACC_R;              /* fxrstor */
        case 2: *size = 4; return ACC_R;                /* ldmxcsr */
        case 3: *size = 4; return ACC_W;                /* stmxcsr */
        case 4: *size = 576; return ACC_W;              /* xsave: the legacy area and header */
        case 5: *size = 576; return ACC_R;              /* xrstor */
        }
        return 0;                                       /* xsaveopt, clflush: no data access */
    }
    *size = 16;
    return ACC_R;
}

/* The accesses of the decoded instruction at r->rip, code its bytes: how many (at most
 * 3) are in out. Stack pushes and pops are 8 bytes (2 with 0x66). */
static int accesses(const struct pv_regs *r, const struct bt_insn *in, const uint8_t *code,
                    int code32, struct access out[3])
{
    uint64_t next = r->rip + in->len, rsp = code32 ? (uint32_t)r->rsp : r->rsp;
    uint32_t size = in->opsize, stack = in->opsize == 2 ? 2 : code32 ? 4 : 8;
    int n = 0, how = 0;

    if (code32 && in->addr32)
        return 0;                       /* 16-bit addressing: not worked out */
    if (in->has_modrm && (in->modrm >> 6) != 3 && !(in->map == 0 && in->opcode == 0x8d)) {
        how = in->map == 0 ? map0_operand(in, &size) : map1_operand(in, &size);
        if (how) {
            out[n].va = modrm_address(r, in, next, code32);
            out[n].size = size;
            out[n++].how = how;
        }
    }
    if (in->map != 0)
        return n;
    uint8_t op = in->opcode;
    int byte = !(op & 1);
    /* the stack: push and call write below rsp; pop, ret, iret and leave read at it */
    if ((op >= 0x50 && op <= 0x57) || op == 0x68 || op == 0x6a || op == 0x9c || op == 0xe8 ||
        (op == 0xff && (((in->modrm >> 3) & 7) == 2 || ((in->modrm >> 3) & 7) == 6)))
        out[n++] = (struct access){ rsp - stack, stack, ACC_W };
    else if ((op >= 0x58 && op <= 0x5f) || op == 0x8f || op == 0x9d || op == 0xc2 || op == 0xc3)
        out[n++] = (struct access){ rsp, stack, ACC_R };
    else if (op == 0xca || op == 0xcb)
        out[n++] = (struct access){ rsp, 2 * stack, ACC_R };
    else if (op == 0xcf)
        out[n++] = (struct access){ rsp, 5 * (in->opsize == 8 ? 8 : 4), ACC_R };
    else if (op == 0xc9)
        out[n++] = (struct access){ r->rbp, stack, ACC_R };
    else if (op == 0xc8)
        out[n++] = (struct access){ rsp - stack, stack, ACC_W };
    /* moffs, string instructions (one element a step: TF traps between iterations), xlat */
    if (op >= 0xa0 && op <= 0xa3) {
        uint64_t at = 0;
        memcpy(&at, code + in->len - (in->addr32 ? 4 : 8), in->addr32 ? 4 : 8);
        out[n++] = (struct access){ seg_base(r, in) + at, byte ? 1 : size, op < 0xa2 ? ACC_R : ACC_W };
    } else if (op >= 0xa4 && op <= 0xaf && op != 0xa8 && op != 0xa9) {
        uint32_t elem = byte ? 1 : size;
        uint64_t si = seg_base(r, in) + (in->addr32 ? (uint32_t)r->rsi : r->rsi);
        uint64_t di = in->addr32 ? (uint32_t)r->rdi : r->rdi;
        if (in->rep && (in->addr32 ? (uint32_t)r->rcx : r->rcx) == 0)
            return n;                   /* no iteration at all */
        if (op <= 0xa7 || op >= 0xac)
            out[n++] = (struct access){ op >= 0xae ? di : si, elem, ACC_R };
        if (op == 0xa4 || op == 0xa5 || op == 0xaa || op == 0xab)
            out[n++] = (struct access){ di, elem, ACC_W };
        else if (op == 0xa6 || op == 0xa7)
            out[n++] = (struct access){ di, elem, ACC_R };
    } else if (op == 0xd7) {
        out[n++] = (struct access){ seg_base(r, in) + r->rbx + (r->rax & 0xff), 1, ACC_R };
    }
    return n;
}

/* 1 if cs names a 32-bit code segment (compat mode). */
static int code32(struct hv_vcpu *v, uint64_t cs)
{
    uint64_t desc;
    return pv_gdt_descriptor(v, (unsigned)(cs & 0xffff), &desc) == 0 && !((desc >> 53) & 1);
}

/* Decode the instruction at r->rip: 0 with *in (code holds its bytes), -1 if unreadable. */
static int fetch(struct hv_vcpu *v, const struct pv_regs *r, uint8_t code[16], struct bt_insn *in)
{
    int avail = 15;

    while (avail > 0 && hv_copy_from_guest(v, code, r->rip, (uint64_t)avail) < 0)
        avail--;                        /* the instruction may end where the mapping does */
    return avail > 0 ? bt_decode_mode(code, avail, in, code32(v, r->cs)) : -1;
}

static uint32_t insn_hits(struct hv_vcpu *v, const struct pv_regs *r, const struct bt_insn *in,
                          const uint8_t *code)
{
    struct access acc[3];
    uint32_t hits = 0;
    int n = accesses(r, in, code, code32(v, r->cs), acc);

    for (int i = 0; i < n; i++)
        hits |= pv_debug_data_hits(&v->pv, acc[i].va, acc[i].size, acc[i].how & ACC_W);
    return hits;
}

/* ---- stepping ---- */

void pv_step_entry(struct hv_vcpu *v, struct pv_regs *r, int debug_trap)
{
    struct pv_step *s = &v->pv.step;

    if (!s->on)
        return;
    if (debug_trap && s->decoded && s->sets_tf)
        s->guest_tf = (r->rflags & RFLAGS_TF) != 0;    /* popf, iretq: what it loaded */
    r->rflags = (r->rflags & ~RFLAGS_TF) | (s->guest_tf ? RFLAGS_TF : 0);
    /* `syscall` saved trapless's TF in r11, where the guest kernel reads it */
    if (!debug_trap && r->rip >= PV_LANDING_VA && r->rip <= PV_LANDING_VA + 2)
        r->r11 = (r->r11 & ~RFLAGS_TF) | (s->guest_tf ? RFLAGS_TF : 0);
    if (!debug_trap) {
        /* it entered the hypervisor: its hits are lost, and a #DB a mov-SS shadow held
         * would be the hypervisor's, which Xen's do_debug drops (XSA-260) */
        s->decoded = 0;
        s->shadow = 0;
        s->shadow_held = 0;
    }
}

int pv_step_trap(struct hv_vcpu *v, struct pv_regs *r, struct hv_stop *stop)
{
    struct pv_step *s = &v->pv.step;
    uint32_t bits = 0;

    if (!s->decoded)
        return 0;                       /* a step whose instruction is unknown */
    s->decoded = 0;
    bits = s->hits | (s->tf_before ? DR6_BS : 0);
    if (s->load_ss && r->rip == s->rip + s->len) {
        /* The CPU trapped right after the mov to SS (this host does so before a
         * `syscall`): the shadow holds the #DB until the next instruction is done. */
        s->shadow = bits;
        s->shadow_held = 1;
        return 0;
    }
    if (s->load_ss)
        bits |= s->next_hits;           /* the CPU held the trap past the next one */
    bits |= s->shadow;
    s->shadow = 0;
    s->shadow_held = 0;
    if (s->pushes_flags) {
        /* pushf stored trapless's TF: the guest's goes there */
        uint16_t low;
        if (hv_copy_from_guest(v, &low, r->rsp, 2) == 0) {
            low = (uint16_t)((low & ~RFLAGS_TF) | (s->tf_before ? RFLAGS_TF : 0));
            hv_copy_to_guest(v, r->rsp, &low, 2);
        }
    }
    return bits || s->icebp ? pv_inject_db(v, r, bits, stop) : 0;
}

int pv_step_resume(struct hv_vcpu *v, struct pv_regs *r, struct hv_stop *stop)
{
    struct pv_vcpu *p = &v->pv;
    struct pv_step *s = &p->step;
    struct bt_insn in, next;
    uint8_t code[16], next_code[16];
    uint32_t hits;

    if (!pv_debug_armed(p, 0) && !pv_debug_armed(p, 1) && !s->shadow_held) {
        s->on = 0;                      /* the guest's TF is the CPU's again */
        s->decoded = 0;
        return 0;
    }
    /* an instruction breakpoint: a fault before it runs, unless RF lets it run once */
    if (!(r->rflags & RFLAGS_RF) && (hits = pv_debug_exec_hits(p, r->rip)) &&
        pv_inject_db(v, r, hits, stop) < 0)
        return -1;
    s->on = 1;
    s->guest_tf = s->tf_before = (r->rflags & RFLAGS_TF) != 0;
    s->decoded = fetch(v, r, code, &in) == 0;
    if (s->decoded) {
        s->rip = r->rip;
        s->len = in.len;
        s->hits = insn_hits(v, r, &in, code);
        s->pushes_flags = in.map == 0 && in.opcode == 0x9c;
        s->sets_tf = in.map == 0 && (in.opcode == 0x9d || in.opcode == 0xcf);
        s->icebp = in.map == 0 && in.opcode == 0xf1;
        s->load_ss = in.kind == BT_LOAD_SS;
        s->next_hits = 0;
        if (s->load_ss) {
            /* the next instruction runs in its shadow, with the registers it leaves */
            struct pv_regs after = *r;
            after.rip += in.len;
            if (fetch(v, &after, next_code, &next) == 0)
                s->next_hits = insn_hits(v, &after, &next, next_code);
        }
    }
    r->rflags |= RFLAGS_TF;
    return 0;
}
