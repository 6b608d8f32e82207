/*
 * pv_emul.c - the instructions Xen emulates for a PV guest kernel that a #UD brings
 * to us: the forced-emulation prefix before cpuid (XEN-ABI-FACTS §18, answered with
 * Xen's PV CPUID policy, §24), and `int n` on hosts whose CPU reports it as #UD
 * (PVM-HOST.md). Of what a #GP brings, reads of the control registers are emulated
 * as Xen does for a PV kernel. Loads from the M2P that fault although the table is
 * mapped readable (this KVM-PVM host refuses ring-3 accesses to L4 slot 256) are
 * emulated too, so the guest sees what Xen's mapping gives it; every other privileged instruction reaches the guest as
 * that #GP (Xen's port I/O under the virtual IOPL, MSRs and control-register writes
 * are not here yet).
 */
#include <cpuid.h>
#include <stddef.h>
#include <string.h>

#include "hv.h"

#define RFLAGS_RF (1ULL << 16)

/* ud2; .ascii "xen"; cpuid */
static const uint8_t forced_cpuid[7] = { 0x0f, 0x0b, 0x78, 0x65, 0x6e, 0x0f, 0xa2 };

/* leaf 1 ecx: what a PV domU cannot use: MONITOR/MWAIT, VMX, SMX, EIST, TM2, PDCM,
 * x2APIC, TSC-deadline; and the hypervisor bit set */
#define LEAF1_ECX_HIDDEN ((1u << 3) | (1u << 5) | (1u << 6) | (1u << 7) | (1u << 8) | \
                          (1u << 15) | (1u << 21) | (1u << 24))
#define LEAF1_ECX_HYPERVISOR (1u << 31)
/* leaf 1 edx: ACPI thermal control, TM, PBE */
#define LEAF1_EDX_HIDDEN ((1u << 22) | (1u << 29) | (1u << 31))

void pv_cpuid(struct hv_vcpu *v, uint32_t leaf, uint32_t subleaf, uint32_t out[4])
{
    memset(out, 0, 4 * sizeof(uint32_t));
    if (leaf >= XEN_CPUID_BASE && leaf < XEN_CPUID_BASE + 0x10000) {
        hv_xen_cpuid(v, leaf - XEN_CPUID_BASE, subleaf, out);
        return;
    }
    __cpuid_count(leaf, subleaf, out[0], out[1], out[2], out[3]);
    if (leaf == 1) {
        out[1] = (out[1] & 0x00ffffff) | (uint32_t)(v->id * 2) << 24;   /* APIC id, as Xen */
        out[2] = (out[2] & ~LEAF1_ECX_HIDDEN) | LEAF1_ECX_HYPERVISOR;
        out[3] &= ~LEAF1_EDX_HIDDEN;
    }
}

/* The guest's view of cr0 and cr4 (XEN-ABI-FACTS §18): what trapless runs it with. */
#define GUEST_CR0 0x80050033ULL     /* PG WP NE ET MP PE */
#define GUEST_CR4 0x620ULL          /* OSXMMEXCPT OSFXSR PAE */

/* Registers by their number in an instruction encoding, in struct pv_regs. */
static uint64_t *gpr(struct pv_regs *r, int n)
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
    return (uint64_t *)((uint8_t *)r + at[n & 15]);
}

int pv_emulate_gp(struct hv_vcpu *v, struct pv_regs *r)
{
    uint8_t code[4];
    int rex = 0, at = 0;
    uint64_t value;

    if (v->pv.user_mode || hv_copy_from_guest(v, code, r->rip, sizeof(code)) < 0)
        return 0;
    if ((code[0] & 0xf0) == 0x40)
        rex = code[at++];
    /* mov %crN, %reg: 0F 20 /r with a register operand */
    if (code[at] != 0x0f || code[at + 1] != 0x20 || (code[at + 2] >> 6) != 3)
        return 0;
    switch (((code[at + 2] >> 3) & 7) | (rex & 4) << 1) {
    case 0: value = GUEST_CR0; break;
    case 2: value = __atomic_load_n(&hv_vcpu_info(v)->arch.cr2, __ATOMIC_ACQUIRE); break;
    case 3: value = v->dom->mm.base_mfn << HV_PAGE_SHIFT; break;    /* the kernel L4 */
    case 4: value = GUEST_CR4; break;
    default: return 0;
    }
    *gpr(r, (code[at + 2] & 7) | (rex & 1) << 3) = value;
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
