/*
 * bt_decode.c - an x86-64 instruction decoder for the bt engine's translator: how long
 * each instruction is, where its ModRM/SIB/displacement are, and whether it is one of
 * the sensitive instructions the VMM takes over (hlt, cli/sti, popf, iret, mov to a
 * control register, wrmsr, lgdt/lidt, invlpg, port I/O ...).
 *
 * It covers the whole 64-bit instruction set's layout (legacy prefixes, REX, the
 * one-byte, 0F, 0F38 and 0F3A maps, VEX and EVEX), not its semantics: TCG executes
 * the instructions; the decoder only finds them. A PVH guest starts in 32-bit
 * protected mode, so the decoder also knows 32-bit code (bt_decode_mode): no REX
 * (40-4F are inc/dec), the opcodes 64-bit mode dropped (push/pop of segments, pusha,
 * far jumps and calls with an immediate pointer, aam ...), 4-byte moffs, 16-bit
 * addressing after 0x67.
 */
#include <string.h>

#include "bt.h"

/* Immediate sizes beyond a plain byte count. */
enum {
    IMM_NONE = 0,
    IMM_Z = -1,         /* 2 or 4 bytes by operand size */
    IMM_V = -2,         /* 2, 4 or 8 (mov r, imm with REX.W) */
    IMM_MOFFS = -3,     /* an address: 8 bytes, 4 with 0x67 */
    IMM_ENTER = -4,     /* imm16 + imm8 */
    IMM_GROUP3 = -5,    /* F6/F7: an immediate only for test (/0, /1) */
    BAD = -100,         /* not an instruction in 64-bit mode */
};

/* Opcodes of 32-bit code that 64-bit mode dropped or gave another meaning. */
static int map0_legacy32(uint8_t op, int opsize, int *modrm)
{
    if (op < 0x40 && (op & 7) >= 6)
        return IMM_NONE;        /* push/pop es cs ss ds, daa das aaa aas */
    if (op >= 0x40 && op <= 0x4f)
        return IMM_NONE;        /* inc/dec r32 */
    switch (op) {
    case 0x60: case 0x61: case 0xce: case 0xd6: return IMM_NONE;  /* pusha popa into salc */
    case 0x62: case 0xc4: case 0xc5: *modrm = 1; return IMM_NONE; /* bound les lds */
    case 0x82: *modrm = 1; return 1;
    case 0x9a: case 0xea: return opsize == 2 ? 4 : 6;             /* ptr16:16 / ptr16:32 */
    case 0xd4: case 0xd5: return 1;                                /* aam aad */
    }
    return BAD;
}

/* The one-byte map: has a ModRM byte? which immediate? */
static int map0(uint8_t op, int *modrm)
{
    *modrm = 0;
    if (op < 0x40) {
        switch (op & 7) {
        case 0: case 1: case 2: case 3:
            *modrm = 1;
            return IMM_NONE;
        case 4:
            return 1;
        case 5:
            return IMM_Z;
        default:
            return BAD;         /* push/pop seg, daa & co: gone in 64-bit mode */
        }
    }
    if (op >= 0x50 && op <= 0x5f)
        return IMM_NONE;
    if (op >= 0x70 && op <= 0x7f)
        return 1;
    if (op >= 0x84 && op <= 0x8f) {
        *modrm = 1;
        return IMM_NONE;
    }
    if (op >= 0x90 && op <= 0x9f)
        return op == 0x9a ? BAD : IMM_NONE;
    if (op >= 0xa0 && op <= 0xa3)
        return IMM_MOFFS;
    if (op >= 0xb0 && op <= 0xb7)
        return 1;
    if (op >= 0xb8 && op <= 0xbf)
        return IMM_V;
    if (op >= 0xd8 && op <= 0xdf) {
        *modrm = 1;             /* x87 */
        return IMM_NONE;
    }
    switch (op) {
    case 0x63: *modrm = 1; return IMM_NONE;
    case 0x68: return IMM_Z;
    case 0x69: *modrm = 1; return IMM_Z;
    case 0x6a: return 1;
    case 0x6b: *modrm = 1; return 1;
    case 0x6c: case 0x6d: case 0x6e: case 0x6f: return IMM_NONE;
    case 0x80: case 0x83: *modrm = 1; return 1;
    case 0x81: *modrm = 1; return IMM_Z;
    case 0xa4: case 0xa5: case 0xa6: case 0xa7: return IMM_NONE;
    case 0xa8: return 1;
    case 0xa9: return IMM_Z;
    case 0xaa: case 0xab: case 0xac: case 0xad: case 0xae: case 0xaf: return IMM_NONE;
    case 0xc0: case 0xc1: case 0xc6: *modrm = 1; return 1;
    case 0xc7: *modrm = 1; return IMM_Z;
    case 0xc2: case 0xca: return 2;
    case 0xc3: case 0xc9: case 0xcb: case 0xcc: case 0xcf: return IMM_NONE;
    case 0xc8: return IMM_ENTER;
    case 0xcd: return 1;
    case 0xd0: case 0xd1: case 0xd2: case 0xd3: *modrm = 1; return IMM_NONE;
    case 0xd7: return IMM_NONE;
    case 0xe0: case 0xe1: case 0xe2: case 0xe3: case 0xe4: case 0xe5: case 0xe6: case 0xe7:
    case 0xeb:
        return 1;
    case 0xe8: case 0xe9: return 4;     /* rel32 whatever the operand size */
    case 0xec: case 0xed: case 0xee: case 0xef: return IMM_NONE;
    case 0xf1: case 0xf4: case 0xf5: return IMM_NONE;
    case 0xf6: case 0xf7: *modrm = 1; return IMM_GROUP3;
    case 0xf8: case 0xf9: case 0xfa: case 0xfb: case 0xfc: case 0xfd: return IMM_NONE;
    case 0xfe: case 0xff: *modrm = 1; return IMM_NONE;
    }
    return BAD;                 /* 60-62, 82, c4, c5, ce, d4-d6, ea and the prefixes */
}

/* The 0F map. */
static int map1(uint8_t op, int *modrm)
{
    *modrm = 1;
    if ((op >= 0x10 && op <= 0x23) || (op >= 0x28 && op <= 0x2f) ||
        (op >= 0x40 && op <= 0x6f) || (op >= 0x74 && op <= 0x76) ||
        (op >= 0x78 && op <= 0x7f) || (op >= 0x90 && op <= 0x9f) ||
        (op >= 0xb0 && op <= 0xb9) || (op >= 0xbb && op <= 0xbf) || op >= 0xd0)
        return IMM_NONE;
    if (op >= 0x80 && op <= 0x8f) {
        *modrm = 0;
        return 4;               /* jcc rel32 */
    }
    if (op >= 0xc8 && op <= 0xcf) {
        *modrm = 0;             /* bswap */
        return IMM_NONE;
    }
    switch (op) {
    case 0x00: case 0x01: case 0x02: case 0x03: case 0x0d:
    case 0xa3: case 0xa5: case 0xab: case 0xad: case 0xae: case 0xaf:
    case 0xc0: case 0xc1: case 0xc3: case 0xc7:
        return IMM_NONE;
    case 0x0f: case 0x70: case 0x71: case 0x72: case 0x73:
    case 0xa4: case 0xac: case 0xba: case 0xc2: case 0xc4: case 0xc5: case 0xc6:
        return 1;
    case 0x05: case 0x06: case 0x07: case 0x08: case 0x09: case 0x0b: case 0x0e:
    case 0x30: case 0x31: case 0x32: case 0x33: case 0x34: case 0x35: case 0x37:
    case 0x77: case 0xa0: case 0xa1: case 0xa2: case 0xa8: case 0xa9: case 0xaa:
        *modrm = 0;
        return IMM_NONE;
    }
    return BAD;
}

/* ModRM and displacement with 16-bit addressing (32-bit code with 0x67): no SIB. */
static int modrm16_len(const uint8_t *p, int avail, struct bt_insn *in)
{
    int mod = p[0] >> 6, rm = p[0] & 7, disp = mod == 1 ? 1 : mod == 2 ? 2 : 0;
    if (mod == 0 && rm == 6)
        disp = 2;
    if (mod == 3)
        disp = 0;
    return avail < 1 + disp ? -1 : 1 + disp;
}

/* ModRM, SIB and displacement: how many bytes from the ModRM byte on. */
static int modrm_len(const uint8_t *p, int avail, struct bt_insn *in, int code32)
{
    int n = 1, mod, rm;
    if (avail < 1)
        return -1;
    in->has_modrm = 1;
    in->modrm = p[0];
    mod = p[0] >> 6;
    rm = p[0] & 7;
    in->disp = 0;
    if (code32 && in->addr32)
        return modrm16_len(p, avail, in);
    if (mod == 3)
        return 1;
    if (rm == 4) {
        if (avail < 2)
            return -1;
        in->sib = p[1];
        n = 2;
        if (mod == 0 && (p[1] & 7) == 5)
            mod = 2;            /* no base: disp32 */
    } else if (mod == 0 && rm == 5) {
        in->disp_at_end_rel = !code32;  /* rip-relative; absolute in 32-bit code */
        mod = 2;
    }
    if (mod == 1) {
        if (avail < n + 1)
            return -1;
        in->disp = (int8_t)p[n];
        n += 1;
    } else if (mod == 2) {
        int32_t d;
        if (avail < n + 4)
            return -1;
        memcpy(&d, p + n, 4);
        in->disp = d;
        n += 4;
    }
    return n;
}

static enum bt_kind classify(const struct bt_insn *in)
{
    uint8_t op = in->opcode, reg = (in->modrm >> 3) & 7, mod = in->modrm >> 6;

    if (in->map == 0) {
        switch (op) {
        case 0xf4: return BT_HLT;
        case 0xfa: return BT_CLI;
        case 0xfb: return BT_STI;
        case 0x9d: return BT_POPF;
        case 0xcf: return BT_IRET;
        case 0xcc: case 0xcd: case 0xce: return BT_INT_N;  /* int3, int n, into */
        case 0xf1: return BT_ICEBP;
        case 0x8e: return reg == 2 ? BT_LOAD_SS : BT_PLAIN;
        case 0x8c: return reg == 2 ? BT_STORE_SS : BT_PLAIN;
        case 0xca: case 0xcb: return BT_FAR_RET;
        case 0xea: case 0x9a: return BT_FAR_JMP;       /* 32-bit code only */
        case 0xff: return mod != 3 && (reg == 3 || reg == 5) ? BT_FAR_JMP : BT_PLAIN;
        case 0xe4: case 0xe5: case 0xe6: case 0xe7:
        case 0xec: case 0xed: case 0xee: case 0xef:
        case 0x6c: case 0x6d: case 0x6e: case 0x6f:
            return BT_PORT_IO;
        }
        return BT_PLAIN;
    }
    if (in->map != 1)
        return BT_PLAIN;
    switch (op) {
    case 0x00:
        return reg == 2 ? BT_LLDT : reg == 3 ? BT_LTR : BT_PLAIN;
    case 0x01:
        if (in->modrm == 0xc1 || in->modrm == 0xd9)
            return BT_VMCALL;   /* vmcall (Intel), vmmcall (AMD): a PVH guest's hypercall */
        if (in->modrm == 0xf8 || in->modrm == 0xd1)
            return BT_PRIV_RING3;   /* swapgs; xsetbv, which TCG would #UD in ring 3
                                     * without CR4.OSXSAVE instead of the CPU's #GP */
        if (mod == 3)           /* lmsw from a register; rdtscp, monitor ... are not ours */
            return reg == 6 ? BT_MOV_CR : BT_PLAIN;
        return reg == 2 ? BT_LGDT : reg == 3 ? BT_LIDT : reg == 6 ? BT_MOV_CR :
               reg == 7 ? BT_INVLPG : BT_PLAIN;
    case 0x06: return BT_CLTS;
    case 0x08: case 0x09: return BT_CACHE;
    case 0x20: case 0x21: return BT_READ_CRDR;
    case 0x07: case 0x35: case 0x33: return BT_PRIV_RING3;     /* sysret, sysexit, rdpmc */
    case 0xae:                  /* F3 0F AE /2, /3 with a register: wrfsbase, wrgsbase */
        return in->rep == 0xf3 && mod == 3 && (reg == 2 || reg == 3) ? BT_WRSEGBASE : BT_PLAIN;
    case 0x22: return BT_MOV_CR;
    case 0x23: return BT_MOV_DR;
    case 0x30: return BT_WRMSR;
    case 0x32: return BT_RDMSR;
    }
    return BT_PLAIN;
}

int bt_decode(const uint8_t *code, int avail, struct bt_insn *in)
{
    return bt_decode_mode(code, avail, in, 0);
}

int bt_decode_mode(const uint8_t *code, int avail, struct bt_insn *in, int code32)
{
    int i = 0, opsize66 = 0, imm, modrm = 0, vex = 0, n;

    memset(in, 0, sizeof(*in));
    if (avail > 15)
        avail = 15;
    /* legacy prefixes, then at most one REX right before the opcode */
    for (;;) {
        if (i >= avail)
            return -1;
        uint8_t b = code[i];
        if (b == 0x66) {
            opsize66 = 1;
            in->simd_prefix = b;
        } else if (b == 0x67) {
            in->addr32 = 1;
        } else if (b == 0x64 || b == 0x65) {
            in->seg = b;
        } else if (b == 0xf2 || b == 0xf3) {
            in->rep = b;
            in->simd_prefix = b;    /* rep, or an SSE instruction's mandatory prefix */
        } else if (b == 0xf0 || b == 0x2e || b == 0x36 || b == 0x3e || b == 0x26) {
            /* lock, branch hints / null segments */
        } else if ((b & 0xf0) == 0x40 && !code32) {
            in->rex = b;
            i++;
            if (i >= avail)
                return -1;
            b = code[i];
            if (b == 0x66 || b == 0x67 || b == 0x64 || b == 0x65 || b == 0xf0 ||
                b == 0xf2 || b == 0xf3 || (b & 0xf0) == 0x40) {
                in->rex = 0;    /* a REX not last is ignored */
                continue;
            }
            break;
        } else {
            break;
        }
        i++;
    }
    in->opsize = (in->rex & 8) ? 8 : opsize66 ? 2 : 4;

    uint8_t b = code[i];
    /* In 32-bit code C4, C5 and 62 are VEX/EVEX only when the next byte's top bits are
     * 11 (a register form of les, lds, bound, which do not exist). */
    int vex_form = b == 0xc4 || b == 0xc5 || b == 0x62;
    if (vex_form && code32 && (i + 1 >= avail || (code[i + 1] & 0xc0) != 0xc0))
        vex_form = 0;
    if (vex_form) {
        /* VEX (2 or 3 bytes) or EVEX (4): the map, then opcode and ModRM */
        int plen = b == 0xc5 ? 2 : b == 0xc4 ? 3 : 4;
        if (i + plen >= avail)
            return -1;
        in->map = b == 0xc5 ? 1 : (code[i + 1] & (b == 0x62 ? 7 : 0x1f));
        if (in->map < 1 || in->map > 3)
            return -1;
        if (b == 0xc4 && (code[i + 2] & 0x80))
            in->opsize = 8;
        i += plen;
        vex = 1;
        in->vex = 1;
    } else if (b == 0x0f) {
        if (i + 1 >= avail)
            return -1;
        if (code[i + 1] == 0x38 || code[i + 1] == 0x3a) {
            in->map = code[i + 1] == 0x38 ? 2 : 3;
            i += 2;
        } else {
            in->map = 1;
            i += 1;
        }
    }
    if (i >= avail)
        return -1;
    in->opcode = code[i++];

    if (in->map == 0) {
        imm = map0(in->opcode, &modrm);
        if (code32 && (imm == BAD || (in->opcode >= 0x40 && in->opcode <= 0x4f)))
            imm = map0_legacy32(in->opcode, in->opsize, &modrm);
    } else if (in->map == 1) {
        imm = map1(in->opcode, &modrm);
        if (vex && in->opcode == 0x77) {
            modrm = 0;          /* vzeroupper / vzeroall */
            imm = IMM_NONE;
        }
    } else {
        modrm = 1;
        imm = in->map == 3 ? 1 : IMM_NONE;
    }
    if (imm == BAD)
        return -1;
    if (modrm) {
        n = modrm_len(code + i, avail - i, in, code32);
        if (n < 0)
            return -1;
        i += n;
    }
    switch (imm) {
    case IMM_Z: imm = in->opsize == 2 ? 2 : 4; break;
    case IMM_V: imm = in->opsize; break;
    case IMM_MOFFS: imm = code32 ? (in->addr32 ? 2 : 4) : in->addr32 ? 4 : 8; break;
    case IMM_ENTER: imm = 3; break;
    case IMM_GROUP3:
        imm = ((in->modrm >> 3) & 7) < 2 ? (in->opcode == 0xf6 ? 1 : in->opsize == 2 ? 2 : 4) : 0;
        break;
    }
    i += imm;
    if (i > avail)
        return -1;
    in->len = (uint8_t)i;
    in->kind = (uint8_t)classify(in);
    return 0;
}

int bt_is_divide(const struct bt_insn *in)
{
    int reg = (in->modrm >> 3) & 7;
    return in->map == 0 && (in->opcode == 0xf6 || in->opcode == 0xf7) && (reg == 6 || reg == 7);
}

int bt_stack_access(const struct bt_insn *in)
{
    int access = 0, mod = in->modrm >> 6, base;

    if (in->map == 0) {
        uint8_t op = in->opcode, reg = (in->modrm >> 3) & 7;
        if ((op >= 0x50 && op <= 0x5f) || op == 0x68 || op == 0x6a || op == 0x9c ||
            op == 0x9d || op == 0xc2 || op == 0xc3 || op == 0xc8 || op == 0xc9 || op == 0xe8 ||
            (op == 0xff && (reg == 2 || reg == 6)) || (op == 0x8f && reg == 0))
            access |= BT_STACK_IMPLICIT;
    }
    if (!in->has_modrm || mod == 3 || in->seg)
        return access;              /* no memory operand, or through FS or GS */
    if ((in->modrm & 7) == 4) {
        if ((in->sib & 7) == 5 && mod == 0)
            return access;          /* no base: disp32 */
        base = (in->sib & 7) | ((in->rex & 1) << 3);
    } else {
        if ((in->modrm & 7) == 5 && mod == 0)
            return access;          /* rip-relative */
        base = (in->modrm & 7) | ((in->rex & 1) << 3);
    }
    return base == 4 || base == 5 ? access | BT_STACK_OPERAND : access;
}
