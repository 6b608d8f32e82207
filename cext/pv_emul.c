/*
 * pv_emul.c - the instructions Xen emulates for a PV guest kernel (XEN-ABI-FACTS §18).
 * A #UD brings the forced-emulation prefix before cpuid (answered with Xen's PV CPUID
 * policy, §24), and `int n` on hosts whose CPU reports it as #UD (PVM-HOST.md). A #GP(0)
 * brings the privileged instructions Xen emulates: mov to and from CR0/2/3/4 and
 * DR0-7, clts, rdmsr/wrmsr of the segment bases (and DEBUGCTL), and in/out and cli/sti
 * under the virtual IOPL or I/O bitmap; the state they change is pv_ctrl.c's. A #GP(0)
 * at a far branch gets back the error code this host or TCG lost; a #PF brings the
 * kernel's stores into its read-only L1 tables (VMASST writable_pagetables) and loads
 * from the M2P this KVM-PVM host refuses although the table is mapped readable (ring 3
 * cannot touch L4 slot 256 here). Everything else reaches the guest as its fault.
 */
#include <cpuid.h>
#include <stddef.h>
#include <string.h>

#include "hv.h"
#include "bt.h"                         /* the x86-64 instruction decoder (bt_decode.c) */

#define RFLAGS_RF (1ULL << 16)

/* ud2; .ascii "xen"; cpuid */
static const uint8_t forced_cpuid[7] = { 0x0f, 0x0b, 0x78, 0x65, 0x6e, 0x0f, 0xa2 };

/* Xen's default PV CPUID policy: of the host's features (the engine's CPU's here), those Xen's featureset
 * (public/arch-x86/cpufeatureset.h) marks 'A', available to every guest by default.
 * 'S' and 'H' features are HVM-only: a PV kernel cannot use them in ring 3 under Xen's
 * page-table rules, and Linux reads them to choose how to run (PSE or 1 GiB pages for
 * its direct map, which a PV L2/L3 entry may not hold; x2APIC, MTRR, VME, PGE...). */
enum {
    PV_1D  = 0x1fc9cbf5,    /* leaf 1 edx: FPU DE TSC MSR PAE MCE CX8 APIC SEP MCA CMOV PAT
                             * CLFLUSH ACPI MMX FXSR SSE SSE2 SS HTT */
    PV_1C  = 0xf6d83203,    /* leaf 1 ecx: SSE3 PCLMULQDQ SSSE3 FMA CX16 SSE4.1/4.2 MOVBE
                             * POPCNT AESNI XSAVE AVX F16C RDRAND HYPERVISOR */
    PV_E1D = 0xea500800,    /* 0x80000001 edx: SYSCALL NX MMXEXT FFXSR RDTSCP LM 3DNOW(EXT) */
    PV_E1C = 0x442109e3,    /* 0x80000001 ecx: LAHF_LM CMP_LEGACY ABM SSE4A MISALIGNSSE
                             * 3DNOWPREFETCH XOP FMA4 TBM DBEXT ADDR_MSK_EXT */
    PV_DA1 = 0x00000007,    /* 0xd:1 eax: XSAVEOPT XSAVEC XGETBV1 */
    PV_7B0 = 0xf1af0b29,    /* 7:0 ebx: FSGSBASE BMI1 AVX2 BMI2 ERMS RTM AVX512F/DQ/IFMA/CD/
                             * BW/VL RDSEED ADX CLFLUSHOPT CLWB SHA */
    PV_7C0 = 0x02405f43,    /* 7:0 ecx: PREFETCHWT1 AVX512_VBMI(2) GFNI VAES VPCLMULQDQ
                             * AVX512_VNNI/BITALG/VPOPCNTDQ RDPID CLDEMOTE */
    PV_7D0 = 0xac804410,    /* 7:0 edx: FSRM MD_CLEAR SERIALIZE AVX512_FP16 IBRSB STIBP
                             * ARCH_CAPS SSBD */
    PV_7A1 = 0x00801c37,    /* 7:1 eax: SHA512 SM3 SM4 AVX_VNNI AVX512_BF16 FZRM FSRS FSRCS
                             * AVX_IFMA */
    PV_E8B = 0x64001005,    /* 0x80000008 ebx: CLZERO RSTR_FP_ERR_PTRS IBPB SSB_NO BTC_NO
                             * IBPB_RET */
};
/* AMD repeats these leaf 1 edx bits in 0x80000001 edx; Xen fills them from leaf 1's. */
#define COMMON_1D 0x0183f3ffu
#define LEAF1_ECX_OSXSAVE (1u << 27)    /* Xen lets its own CR4.OSXSAVE show (cpuid.c) */
#define LEAF1_ECX_HYPERVISOR (1u << 31)
/* leaf 7 ebx: FSGSBASE */
#define LEAF7_EBX_FSGSBASE (1u << 0)

/* The CPUID of the CPU the guest runs on: the host's under KVM, TCG's model on bt. */
static void base_cpuid(struct hv_vcpu *v, uint32_t leaf, uint32_t subleaf, uint32_t out[4])
{
    if (v->ops && v->ops->cpuid)
        v->ops->cpuid(v, leaf, subleaf, out);
    else
        __cpuid_count(leaf, subleaf, out[0], out[1], out[2], out[3]);
}

/* Leaf 0xd, XSAVE, as Xen fills it from the policy and the vCPU's own XCR0: no
 * supervisor components (XSS is 0 for PV: no XSAVES), and the sizes of the areas for
 * the components the guest enabled (0:ebx standard format, 1:ebx compacted). out holds
 * the host's answer. */
#define XSAVE_LEGACY_AND_HEADER 576
static void xsave_leaf(struct hv_vcpu *v, uint32_t subleaf, uint32_t out[4])
{
    uint32_t main[4], part[4], size = XSAVE_LEGACY_AND_HEADER;
    uint64_t supported, xcr0 = v->pv.xcr0;

    base_cpuid(v, 0xd, 0, main);
    supported = (uint64_t)main[3] << 32 | main[0];
    if (subleaf >= 2) {
        if (subleaf >= 63 || !(supported >> subleaf & 1) || (out[2] & 1))
            out[0] = out[1] = out[2] = out[3] = 0;
        return;
    }
    for (uint32_t i = 2; i < 63; i++) {
        if (!((xcr0 & supported) >> i & 1))
            continue;
        base_cpuid(v, 0xd, i, part);
        if (subleaf == 0) {
            if (part[1] + part[0] > size)
                size = part[1] + part[0];       /* offset + size, standard format */
        } else {
            if (part[2] & 2)
                size = (size + 63) & ~63u;      /* aligned to 64 when compacted */
            size += part[0];
        }
    }
    out[1] = size;
    if (subleaf == 1) {
        out[0] &= PV_DA1;
        out[2] = out[3] = 0;                    /* no XSS components */
    }
}

void pv_cpuid(struct hv_vcpu *v, uint32_t leaf, uint32_t subleaf, uint32_t out[4])
{
    memset(out, 0, 4 * sizeof(uint32_t));
    if (leaf >= XEN_CPUID_BASE && leaf < XEN_CPUID_BASE + 0x10000) {
        hv_xen_cpuid(v, leaf - XEN_CPUID_BASE, subleaf, out);
        return;
    }
    base_cpuid(v, leaf, subleaf, out);
    switch (leaf) {
    case 1:
        out[1] = (out[1] & 0x00ffffff) | (uint32_t)(v->id * 2) << 24;   /* APIC id, as Xen */
        out[2] = (out[2] & (PV_1C | LEAF1_ECX_OSXSAVE)) | LEAF1_ECX_HYPERVISOR;
        out[3] &= PV_1D;
        break;
    case 7:
        if (subleaf == 0) {
            out[1] &= PV_7B0;
            out[2] &= PV_7C0;
            out[3] &= PV_7D0;
        } else {
            out[0] = subleaf == 1 ? out[0] & PV_7A1 : 0;
            out[1] = out[2] = out[3] = 0;
        }
        break;
    case 0xd:
        xsave_leaf(v, subleaf, out);
        break;
    case 0x80000001: {
        uint32_t l1[4];
        base_cpuid(v, 1, 0, l1);
        out[2] &= PV_E1C;
        out[3] = (out[3] & PV_E1D & ~COMMON_1D) |
                 ((out[3] & COMMON_1D) ? l1[3] & PV_1D & COMMON_1D : 0);
        break;
    }
    case 0x80000007:
        out[3] = 0;                 /* no 'A' feature in its edx (invariant TSC is 'a') */
        break;
    case 0x80000008:
        out[1] &= PV_E8B;
        break;
    }
    /* FSGSBASE only where the engine makes the instructions #UD while the guest's
     * CR4.FSGSBASE is clear; without it pv_write_cr drops the CR4 bit, as Xen's
     * pv_fixup_guest_cr4 drops a bit whose feature the policy lacks */
    if (leaf == 7 && subleaf == 0 && !v->dom->engine->cr4_fsgsbase)
        out[1] &= ~LEAF7_EBX_FSGSBASE;
}

/* Where a register is in struct pv_regs, by its number in an instruction encoding (rax
 * rcx rdx rbx rsp rbp rsi rdi r8..r15): the emulator's, and the stepping decoder's
 * (pv_debug.c). */
size_t pv_gpr_offset(int n)
{
    static const size_t at[16] = {
        offsetof(struct pv_regs, rax), offsetof(struct pv_regs, rcx),
        offsetof(struct pv_regs, rdx), offsetof(struct pv_regs, rbx),
        offsetof(struct pv_regs, rsp), offsetof(struct pv_regs, rbp),
        offsetof(struct pv_regs, rsi), offsetof(struct pv_regs, rdi),
        offsetof(struct pv_regs, r8), offsetof(struct pv_regs, r9),
        offsetof(struct pv_regs, r10), offsetof(struct pv_regs, r11),
        offsetof(struct pv_regs, r12), offsetof(struct pv_regs, r13),
        offsetof(struct pv_regs, r14), offsetof(struct pv_regs, r15),
    };
    return at[n & 15];
}

static uint64_t *gpr(struct pv_regs *r, int n)
{
    return (uint64_t *)((uint8_t *)r + pv_gpr_offset(n));
}

#define MSR_UCODE_REV       0x8b        /* Intel's IA32_UCODE_REV, AMD's PATCHLEVEL */
#define MSR_DEBUGCTL        0x1d9
#define MSR_FS_BASE         0xc0000100
#define MSR_GS_BASE         0xc0000101
#define MSR_SHADOW_GS_BASE  0xc0000102

static int canonical(uint64_t va)
{
    uint64_t top = va >> 47;
    return top == 0 || top == 0x1ffff;
}

static uint32_t guest_vendor_ebx(struct hv_vcpu *v)
{
    uint32_t vendor[4];
    pv_cpuid(v, 0, 0, vendor);
    return vendor[1];
}

/* The MSRs Xen lets a PV kernel read: the segment bases (the shadow GS base is the
 * user one, inactive in kernel mode), DEBUGCTL, which reads 0, and the microcode
 * revision for an Intel or AMD guest (Xen's guest_rdmsr forwards the host's last
 * load; trapless's virtual CPU has had no microcode loaded: 0). -1: the #GP. */
static int read_msr(struct hv_vcpu *v, struct pv_regs *r, uint32_t msr, uint64_t *value)
{
    uint32_t vendor;

    switch (msr) {
    case MSR_FS_BASE:        *value = r->fs_base; return 0;
    case MSR_GS_BASE:        *value = r->gs_base; return 0;
    case MSR_SHADOW_GS_BASE: *value = v->pv.gs_base_other; return 0;
    case MSR_DEBUGCTL:       *value = 0; return 0;
    case MSR_UCODE_REV:
        vendor = guest_vendor_ebx(v);
        if (vendor != VENDOR_INTEL_EBX && vendor != VENDOR_AMD_EBX)
            return -1;
        *value = 0;
        return 0;
    }
    return -1;
}

/* ... and write: the segment bases, canonical ones only; and 0 to the microcode
 * revision from an Intel guest, which Intel's manual tells an OS to write before it
 * reads the revision (Xen's guest_wrmsr allows exactly that). */
static int write_msr(struct hv_vcpu *v, struct pv_regs *r, uint32_t msr, uint64_t value)
{
    if (msr == MSR_UCODE_REV)
        return value == 0 && guest_vendor_ebx(v) == VENDOR_INTEL_EBX ? 0 : -1;
    if (!canonical(value))
        return -1;
    switch (msr) {
    case MSR_FS_BASE:        r->fs_base = value; return 0;
    case MSR_GS_BASE:        r->gs_base = value; return 0;
    case MSR_SHADOW_GS_BASE: v->pv.gs_base_other = value; return 0;
    }
    return -1;
}

/* in/out: the guest may reach no device, so, as Xen does for a domU's ports it was
 * not granted, a read gives all-ones and a write is dropped. 1 if done. */
/* I/O breakpoints (CR4.DE, R/W 10): B0-B3 of those the ports [port, port + bytes)
 * overlap, each aligned down to its LEN (1, 2, 8, 4 bytes for 00, 01, 10, 11). Their
 * enables are in dr7_io (pv_ctrl.c), their R/W and LEN fields in dr[7]. */
static uint32_t io_breakpoint_hits(const struct pv_vcpu *p, unsigned port, unsigned bytes)
{
    static const uint8_t lens[4] = { 1, 2, 8, 4 };
    uint32_t hits = 0;

    if (!(p->cr4 & PV_CR4_DE))
        return 0;
    for (int i = 0; i < 4; i++) {
        uint64_t len = lens[(p->dr[7] >> (18 + 4 * i)) & 3], start = p->dr[i] & ~(len - 1);
        if (((p->dr7_io >> (2 * i)) & 3) && ((p->dr[7] >> (16 + 4 * i)) & 3) == 2 &&
            port < start + len && port + bytes > start)
            hits |= 1u << i;
    }
    return hits;
}

static int emulate_port_io(struct hv_vcpu *v, struct pv_regs *r, const uint8_t *op, int at,
                           int opsize16)
{
    int in = !(op[0] & 2), bytes = (op[0] & 1) ? (opsize16 ? 2 : 4) : 1;
    unsigned port = (op[0] & 8) ? (unsigned)(r->rdx & 0xffff) : op[1];

    if (!pv_ports_ok(v, port, (unsigned)bytes))
        return 0;
    if (in) {
        if (bytes == 4)
            r->rax = 0xffffffffULL;         /* a 32-bit result zero-extends */
        else
            r->rax |= bytes == 2 ? 0xffffULL : 0xffULL;
    }
    r->rip += (uint64_t)at + ((op[0] & 8) ? 1 : 2);
    v->pv.io_db_hits = io_breakpoint_hits(&v->pv, port, (unsigned)bytes);
    return 1;
}

int pv_emulate_gp(struct hv_vcpu *v, struct pv_regs *r)
{
    uint8_t code[8];
    int rex = 0, at = 0, opsize16 = 0, avail = sizeof(code), kernel = !v->pv.user_mode;
    uint64_t value;

    while (avail > 0 && hv_copy_from_guest(v, code, r->rip, (uint64_t)avail) < 0)
        avail--;                        /* the instruction may end a page early */
    if (avail < 2)
        return 0;
    if (code[at] == 0x66)
        opsize16 = 1, at++;
    if ((code[at] & 0xf0) == 0x40)
        rex = code[at++];
    if (at + 1 > avail)
        return 0;
    switch (code[at]) {
    case 0xe4: case 0xe5: case 0xe6: case 0xe7:     /* in/out with an imm8 port */
        if (at + 2 > avail)
            return 0;
        /* fall through */
    case 0xec: case 0xed: case 0xee: case 0xef:     /* in/out with the port in dx */
        return emulate_port_io(v, r, code + at, at, opsize16);
    case 0xfa: case 0xfb:
        /* cli/sti: nothing (events are masked in vcpu_info), if the IOPL allows */
        if (!pv_iopl_ok(v))
            return 0;
        r->rip += (uint64_t)at + 1;
        return 1;
    case 0x0f:
        if (at + 3 > avail)
            return 0;
        break;
    default:
        return 0;
    }
    if (!kernel)
        return 0;                       /* the rest is for the guest kernel only */
    uint8_t op = code[at + 1], modrm = code[at + 2];
    int reg = ((modrm >> 3) & 7) | (rex & 4) << 1, rm = (modrm & 7) | (rex & 1) << 3;
    switch (op) {
    case 0x06:                          /* clts */
        pv_write_cr(v, 0, pv_read_cr(v, 0) & ~PV_CR0_TS);
        r->rip += (uint64_t)at + 2;
        return 1;
    case 0x20: case 0x22:               /* mov %crN, %reg / mov %reg, %crN */
        if ((modrm >> 6) != 3 || (reg != 0 && reg != 2 && reg != 3 && reg != 4))
            return 0;
        if (op == 0x20)
            *gpr(r, rm) = pv_read_cr(v, reg);
        else if (pv_write_cr(v, reg, *gpr(r, rm)) < 0)
            return 0;
        break;
    case 0x21: case 0x23:               /* mov %drN, %reg / mov %reg, %drN */
        if ((modrm >> 6) != 3 || reg > 7)
            return 0;
        if (op == 0x21) {
            if (pv_get_debugreg(v, reg, &value) < 0)
                return 0;
            *gpr(r, rm) = value;
        } else if (pv_set_debugreg(v, reg, *gpr(r, rm)) < 0) {
            return 0;
        }
        break;
    case 0x32:                          /* rdmsr */
        if (read_msr(v, r, (uint32_t)r->rcx, &value) < 0)
            return 0;
        r->rax = (uint32_t)value;
        r->rdx = value >> 32;
        r->rip += (uint64_t)at + 2;
        return 1;
    case 0x01:                          /* xsetbv: 0F 01 D1, with CR4.OSXSAVE set */
        if (modrm != 0xd1 || !(v->pv.cr4 & PV_CR4_OSXSAVE) ||
            pv_write_xcr(v, (uint32_t)r->rcx, (uint32_t)r->rax | r->rdx << 32) < 0)
            return 0;
        break;
    case 0x30:                          /* wrmsr */
        if (write_msr(v, r, (uint32_t)r->rcx, (uint32_t)r->rax | r->rdx << 32) < 0)
            return 0;
        r->rip += (uint64_t)at + 2;
        return 1;
    default:
        return 0;
    }
    r->rip += (uint64_t)at + 3;
    return 1;
}

/* Bytes of ModRM, SIB and displacement for a ModRM byte at code[0] (64-bit addressing). */
static int modrm_length(const uint8_t *code)
{
    int mod = code[0] >> 6, rm = code[0] & 7, n = 1;
    if (mod == 3)
        return -1;                      /* a register operand: not a load */
    if (rm == 4) {
        n++;                            /* SIB */
        if (mod == 0 && (code[1] & 7) == 5)
            n += 4;                     /* no base: disp32 */
    } else if (mod == 0 && rm == 5) {
        n += 4;                         /* rip + disp32 */
    }
    return n + (mod == 1 ? 1 : mod == 2 ? 4 : 0);
}

/* The effective address of a ModRM memory operand at code[0] (64-bit addressing);
 * insn_end is the address after the instruction, for rip-relative operands. */
static uint64_t effective_address(struct pv_regs *r, const uint8_t *code, int rex,
                                  uint64_t insn_end)
{
    int mod = code[0] >> 6, rm = code[0] & 7, at = 1;
    uint64_t ea = 0;
    int32_t disp = 0;

    if (rm == 4) {                      /* SIB */
        uint8_t sib = code[at++];
        int base = (sib & 7) | (rex & 1) << 3, index = ((sib >> 3) & 7) | (rex & 2) << 2;
        if (index != 4)
            ea += *gpr(r, index) << (sib >> 6);
        if ((sib & 7) == 5 && mod == 0) {
            memcpy(&disp, code + at, 4);
            at += 4;
        } else {
            ea += *gpr(r, base);
        }
    } else if (mod == 0 && rm == 5) {
        memcpy(&disp, code + at, 4);
        return insn_end + (uint64_t)(int64_t)disp;
    } else {
        ea += *gpr(r, rm | (rex & 1) << 3);
    }
    if (mod == 1)
        disp = (int8_t)code[at];
    else if (mod == 2)
        memcpy(&disp, code + at, 4);
    return ea + (uint64_t)(int64_t)disp;
}

uint32_t pv_far_branch_error(struct hv_vcpu *v, struct pv_regs *r)
{
    uint8_t code[16];
    int at = 0, rex = 0, opsize16 = 0, len, avail = sizeof(code);
    uint64_t seg_base = 0, ea;
    uint32_t vendor[4];
    uint16_t sel;
    unsigned offset_bytes;

    while (avail > 0 && hv_copy_from_guest(v, code, r->rip, (uint64_t)avail) < 0)
        avail--;
    for (; at < 4 && at < avail; at++) {
        if (code[at] == 0x66)
            opsize16 = 1;
        else if (code[at] == 0x64)
            seg_base = r->fs_base;
        else if (code[at] == 0x65)
            seg_base = r->gs_base;
        else
            break;
    }
    if (at < avail && (code[at] & 0xf0) == 0x40)
        rex = code[at++];
    /* call far / jmp far through memory: FF /3, FF /5 */
    if (at + 2 > avail || code[at] != 0xff || (((code[at + 1] >> 3) & 7) != 3 &&
                                               ((code[at + 1] >> 3) & 7) != 5) ||
        (len = modrm_length(code + at + 1)) < 0 || at + 1 + len > avail)
        return 0;
    /* the far pointer is m16:16, m16:32, or m16:64 with REX.W on Intel only (AMD
     * ignores REX.W there), as the guest's CPUID vendor says */
    pv_cpuid(v, 0, 0, vendor);
    offset_bytes = opsize16 ? 2 : ((rex & 8) && vendor[1] != VENDOR_AMD_EBX) ? 8 : 4;
    ea = seg_base + effective_address(r, code + at + 1, rex, r->rip + (uint64_t)at + 1 + len);
    if (hv_copy_from_guest(v, &sel, ea + offset_bytes, 2) < 0 || (sel & 0xfffc) == 0)
        return 0;
    /* a present code segment could be used: the #GP(0) was for something else */
    uint64_t desc;
    if (pv_gdt_descriptor(v, sel, &desc) == 0 && (desc & (1ULL << 47)) &&
        ((desc >> 43) & 3) == 3)
        return 0;
    return sel & 0xfffc;
}

/* Arithmetic flags of a logical result (and/or/xor): CF = OF = 0, ZF, SF, PF. */
#define RFLAGS_LOGIC (0x1ULL | 0x4ULL | 0x40ULL | 0x80ULL | 0x800ULL)
static uint64_t logic_flags(uint64_t result, int size)
{
    uint64_t flags = 0, bits = (uint64_t)size * 8;
    uint64_t v = bits == 64 ? result : result & ((1ULL << bits) - 1);
    if (!v)
        flags |= 0x40;                                  /* ZF */
    if (v >> (bits - 1) & 1)
        flags |= 0x80;                                  /* SF */
    if (!(__builtin_popcount((unsigned)(v & 0xff)) & 1))
        flags |= 0x4;                                   /* PF */
    return flags;
}

/* VMASST writable_pagetables (Xen's ptwr): a guest kernel store into an L1 table it
 * maps read-only is applied as that entry's MMU_NORMAL_PT_UPDATE, validated like one,
 * or the #PF stands. Xen runs its whole emulator here; trapless decodes the forms a
 * kernel uses on a PTE: mov (89, C7 /0), xchg (87), cmpxchg (0F B1), and the
 * read-modify-write logic ops and/or/xor with a register (21, 09, 31) or an immediate
 * (80, 81, 83 /4 /1 /6), any of them locked or with a segment prefix (Linux patches
 * `lock` into `ds` on one CPU), on a byte, dword or qword within one entry. */
int pv_emulate_ptwr(struct hv_vcpu *v, struct pv_regs *r, uint64_t cr2)
{
    struct hv_domain *d = v->dom;
    uint8_t code[16];
    int at = 0, rex = 0, opsize16 = 0, len, avail = sizeof(code), size, reg, imm_bytes = 0;
    int logic = 0;                      /* 1 and, 2 or, 3 xor */
    uint64_t gpa, mfn, value, old, cur, merged, mask;
    unsigned shift;
    const struct hv_frame *f;
    uint8_t op;

    if (v->pv.user_mode || !(v->pv.vm_assist & (1ULL << VMASST_TYPE_writable_pagetables)) ||
        !d->mm.frames || hv_gva_to_gpa(v, cr2, 0, &gpa) < 0)
        return 0;
    mfn = gpa >> HV_PAGE_SHIFT;
    f = &d->mm.frames[mfn];
    if (mfn >= d->mm.nr_pages || !f->type_count || f->type != HV_FT_L1)
        return 0;                       /* only an L1 table's writes are emulated */
    while (avail > 0 && hv_copy_from_guest(v, code, r->rip, (uint64_t)avail) < 0)
        avail--;
    for (; at < 4 && at < avail; at++) {        /* lock, operand size, segments */
        uint8_t p = code[at];
        if (p == 0x66)
            opsize16 = 1;
        else if (p != 0xf0 && p != 0x2e && p != 0x36 && p != 0x3e && p != 0x26)
            break;
    }
    if (at < avail && (code[at] & 0xf0) == 0x40)
        rex = code[at++];
    if (at + 2 > avail)
        return 0;
    op = code[at];
    reg = ((code[at + 1] >> 3) & 7) | (rex & 4) << 1;
    size = (rex & 8) ? 8 : opsize16 ? 2 : 4;
    switch (op) {
    case 0x0f:                          /* cmpxchg r/m, r: 0F B1 /r */
        if (code[++at] != 0xb1)
            return 0;
        reg = ((code[at + 1] >> 3) & 7) | (rex & 4) << 1;
        break;
    case 0x89: case 0x87:               /* mov r/m, r; xchg */
        break;
    case 0xc7:                          /* mov r/m, imm32 */
        if (((code[at + 1] >> 3) & 7) != 0)
            return 0;
        imm_bytes = 4;
        break;
    case 0x21: logic = 1; break;        /* and r/m, r */
    case 0x09: logic = 2; break;        /* or r/m, r */
    case 0x31: logic = 3; break;        /* xor r/m, r */
    case 0x80: case 0x81: case 0x83: {  /* and/or/xor r/m, imm */
        int ext = (code[at + 1] >> 3) & 7;
        logic = ext == 4 ? 1 : ext == 1 ? 2 : ext == 6 ? 3 : 0;
        if (!logic)
            return 0;
        if (op == 0x80)
            size = 1;
        imm_bytes = op == 0x81 ? 4 : 1;
        break;
    }
    default:
        return 0;
    }
    if ((len = modrm_length(code + at + 1)) < 0 || at + 1 + len + imm_bytes > avail)
        return 0;
    if (size == 2 || (cr2 & (uint64_t)(size - 1)))
        return 0;                       /* a byte, an aligned half or a whole entry */
    if (imm_bytes == 4) {
        int32_t imm;
        memcpy(&imm, code + at + 1 + len, 4);
        value = (uint64_t)(int64_t)imm;
    } else if (imm_bytes == 1) {
        value = (uint64_t)(int64_t)(int8_t)code[at + 1 + len];
    } else {
        value = *gpr(r, reg);
    }
    old = *(const uint64_t *)(d->ram + (gpa & ~7ULL));
    shift = (unsigned)(cr2 & 7) * 8;
    mask = size == 8 ? ~0ULL : ((1ULL << (size * 8)) - 1) << shift;
    cur = (old & mask) >> shift;        /* the operand as it is now */
    if (logic) {
        value = logic == 1 ? cur & value : logic == 2 ? cur | value : cur ^ value;
        r->rflags = (r->rflags & ~RFLAGS_LOGIC) | logic_flags(value, size);
    }
    merged = (old & ~mask) | ((value << shift) & mask);
    if (op == 0x0f) {                   /* cmpxchg: only if rax holds what is there */
        uint64_t want = size == 8 ? r->rax : r->rax & 0xffffffffULL;
        if (cur != want) {
            r->rax = cur;               /* a 32-bit one zero-extends */
            r->rflags &= ~0x40ULL;      /* ZF clear */
            r->rip += (uint64_t)at + 1 + (uint64_t)len;
            return 1;
        }
        r->rflags |= 0x40ULL;
    }
    /* the write is an MMU_NORMAL_PT_UPDATE: validated as one, or the #PF stands */
    if (hv_mm_write_pte(d, gpa & ~7ULL, merged) < 0)
        return 0;
    if (op == 0x87)                     /* xchg hands the old value back */
        *gpr(r, reg) = cur;
    r->rip += (uint64_t)at + 1 + (uint64_t)len + (uint64_t)imm_bytes;
    return 1;
}

int pv_emulate_m2p_load(struct hv_vcpu *v, struct pv_regs *r, uint64_t cr2)
{
    uint8_t code[16];
    int rex = 0, at = 0, len, ring3, size;
    uint64_t gpa, value = 0;
    const uint8_t *src;

    if (v->pv.user_mode || cr2 < MACH2PHYS_VIRT_START || cr2 >= MACH2PHYS_VIRT_END ||
        pv_region_walk(v->dom, cr2, &gpa, &ring3) < 0 || !ring3 ||
        hv_copy_from_guest(v, code, r->rip, sizeof(code)) < 0)
        return 0;
    if ((code[0] & 0xf0) == 0x40)
        rex = code[at++];
    /* mov m32/m64, reg (8B /r), within one page of the table */
    if (code[at] != 0x8b || (len = modrm_length(code + at + 1)) < 0)
        return 0;
    size = (rex & 8) ? 8 : 4;
    if ((cr2 & (HV_PAGE_SIZE - 1)) + (uint64_t)size > HV_PAGE_SIZE ||
        gpa < PV_REGION_GPA || gpa - PV_REGION_GPA >= v->dom->pv_region_bytes)
        return 0;
    src = v->dom->pv_region + (gpa - PV_REGION_GPA) + (cr2 & (HV_PAGE_SIZE - 1));
    memcpy(&value, src, (size_t)size);
    *gpr(r, ((code[at + 1] >> 3) & 7) | (rex & 4) << 1) = value;   /* 32-bit: zero-extended */
    r->rip += (uint64_t)at + 1 + (uint64_t)len;
    return 1;
}

int pv_emulate_ud(struct hv_vcpu *v, struct pv_regs *r, struct hv_stop *stop)
{
    uint8_t code[sizeof(forced_cpuid)];

    if (hv_copy_from_guest(v, code, r->rip, 2) < 0)
        return 0;
    if (code[0] == 0xcd)                /* int imm8, which this host reports as #UD */
        return pv_int_n(v, r, code[1], 2, stop) < 0 ? -1 : 1;
    if (hv_copy_from_guest(v, code, r->rip, sizeof(code)) == 0 &&
        memcmp(code, forced_cpuid, sizeof(code)) == 0) {
        uint32_t out[4];
        pv_cpuid(v, (uint32_t)r->rax, (uint32_t)r->rcx, out);
        r->rax = out[0];
        r->rbx = out[1];
        r->rcx = out[2];
        r->rdx = out[3];
        r->rip += sizeof(forced_cpuid);
        r->rflags &= ~RFLAGS_RF;
        return 1;
    }
    return 0;
}

int pv_stack_fault_vector(struct hv_vcpu *v, const struct pv_regs *r)
{
    uint8_t code[15];
    struct bt_insn in;
    int avail = sizeof(code);

    if ((r->cs | 3) != FLAT_RING3_CS64 && pv_compat_code(v, r->cs))
        return 12;                      /* compat code keeps its segments' limits */
    while (avail > 0 && hv_copy_from_guest(v, code, r->rip, (uint64_t)avail) < 0)
        avail--;
    if (avail == 0 || bt_decode(code, avail, &in) < 0)
        return 12;
    return bt_stack_access(&in) ? 12 : 13;
}
