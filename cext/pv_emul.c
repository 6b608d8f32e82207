/*
 * pv_emul.c - the instructions Xen emulates for a PV guest kernel that a #UD brings
 * to us: the forced-emulation prefix before cpuid (XEN-ABI-FACTS §18, answered with
 * Xen's PV CPUID policy, §24), and `int n` on hosts whose CPU reports it as #UD
 * (PVM-HOST.md). Every other privileged instruction reaches the guest as the #GP the
 * CPU raised; Xen's emulation of those (port I/O under the virtual IOPL, MSRs, control
 * registers) is not here yet.
 */
#include <cpuid.h>
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

/* The guest's TSC rate in kHz from the PV clock's scale: ns = (tsc << shift) * mul >> 32. */
static uint32_t tsc_khz(struct hv_vcpu *v)
{
    double per_ns = (double)v->tsc_to_system_mul / 4294967296.0;
    per_ns = v->tsc_shift >= 0 ? per_ns * (double)(1u << v->tsc_shift)
                               : per_ns / (double)(1u << -v->tsc_shift);
    return per_ns > 0 ? (uint32_t)(1e6 / per_ns + 0.5) : 0;
}

static void xen_leaf(struct hv_vcpu *v, uint32_t index, uint32_t subleaf, uint32_t out[4])
{
    uint32_t host[4];
    switch (index) {
    case 0:
        out[0] = XEN_CPUID_BASE + 5;
        out[1] = 0x566e6558;            /* "XenVMMXenVMM" */
        out[2] = 0x65584d4d;
        out[3] = 0x4d4d566e;
        return;
    case 1:
        out[0] = (TRAPLESS_XEN_MAJOR << 16) | TRAPLESS_XEN_MINOR;
        return;
    case 2:
        out[0] = 1;                     /* one hypercall page */
        out[1] = XEN_CPUID_BASE;        /* the MSR that places it */
        out[2] = 1;                     /* PV: MMU_PT_UPDATE_PRESERVE_AD */
        return;
    case 3:
        if (subleaf == 0) {
            out[2] = tsc_khz(v);        /* TSC not emulated, default mode, guest kHz */
        } else if (subleaf == 1) {
            out[0] = (uint32_t)v->tsc_offset;
            out[1] = (uint32_t)((uint64_t)v->tsc_offset >> 32);
            out[2] = v->tsc_to_system_mul;
            out[3] = (uint32_t)(int32_t)v->tsc_shift;
        } else if (subleaf == 2) {
            out[0] = tsc_khz(v);
        }
        return;
    case 5:
        if (subleaf == 0) {             /* PV: the widest machine address */
            __cpuid(0x80000008, host[0], host[1], host[2], host[3]);
            out[1] = host[0] & 0xff;
        }
        return;
    }
    /* base+4 is HVM's; the rest of Xen's range reads as zeros */
}

void pv_cpuid(struct hv_vcpu *v, uint32_t leaf, uint32_t subleaf, uint32_t out[4])
{
    memset(out, 0, 4 * sizeof(uint32_t));
    if (leaf >= XEN_CPUID_BASE && leaf < XEN_CPUID_BASE + 0x10000) {
        xen_leaf(v, leaf - XEN_CPUID_BASE, subleaf, out);
        return;
    }
    __cpuid_count(leaf, subleaf, out[0], out[1], out[2], out[3]);
    if (leaf == 1) {
        out[1] = (out[1] & 0x00ffffff) | (uint32_t)(v->id * 2) << 24;   /* APIC id, as Xen */
        out[2] = (out[2] & ~LEAF1_ECX_HIDDEN) | LEAF1_ECX_HYPERVISOR;
        out[3] &= ~LEAF1_EDX_HIDDEN;
    }
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
