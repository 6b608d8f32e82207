/*
 * xen_cpuid.c - Xen's hypervisor CPUID leaves (XEN_CPUID_BASE .. +5), one answer for
 * both ways a guest asks: a PV kernel through the forced-emulation prefix (pv_emul.c),
 * a PVH guest through an ordinary cpuid (pvh.c). Layouts: public/arch-x86/cpuid.h.
 */
#include <cpuid.h>
#include <string.h>

#include "hv.h"

#define XEN_LAST_LEAF 5             /* base + 5: PV's; base + 4 is HVM's */

/* The guest TSC's rate in kHz, from the PV clock's scale: ns = (tsc << shift) * mul >> 32. */
static uint32_t guest_tsc_khz(struct hv_vcpu *v)
{
    uint64_t mul = v->tsc_to_system_mul, per_ms;
    if (!mul)
        return 0;
    per_ms = (1000000ULL << 32) / mul;          /* ticks per ms at shift 0 */
    if (v->tsc_shift >= 0)
        per_ms >>= v->tsc_shift;
    else
        per_ms <<= -v->tsc_shift;
    return (uint32_t)per_ms;
}

void hv_xen_cpuid(struct hv_vcpu *v, uint32_t index, uint32_t subleaf, uint32_t out[4])
{
    int pvh = v->dom->guest_type == HV_GUEST_PVH;
    uint32_t host[4];

    memset(out, 0, 4 * sizeof(out[0]));
    switch (index) {
    case 0:                         /* the last leaf and the signature "XenVMMXenVMM" */
        out[0] = XEN_CPUID_BASE + XEN_LAST_LEAF;
        out[1] = 0x566e6558;
        out[2] = 0x65584d4d;
        out[3] = 0x4d4d566e;
        break;
    case 1:                         /* the version */
        out[0] = (TRAPLESS_XEN_MAJOR << 16) | TRAPLESS_XEN_MINOR;
        break;
    case 2:                         /* one hypercall page, the MSR that places it */
        out[0] = 1;
        out[1] = XEN_CPUID_BASE;
        if (!pvh)
            out[2] = 1;             /* PV: MMU_PT_UPDATE_PRESERVE_AD */
        break;
    case 3:                         /* time */
        if (subleaf == 0) {
            out[2] = guest_tsc_khz(v);          /* TSC mode 0 (default), guest kHz */
        } else if (subleaf == 1) {
            out[0] = (uint32_t)v->tsc_offset;   /* the PV clock's offset and scale */
            out[1] = (uint32_t)((uint64_t)v->tsc_offset >> 32);
            out[2] = v->tsc_to_system_mul;
            out[3] = (uint32_t)(int32_t)v->tsc_shift;
        } else if (subleaf == 2) {
            out[0] = guest_tsc_khz(v);          /* the host's kHz: the same rate here */
        }
        break;
    case 4:                         /* HVM: features, the vCPU id and the domid */
        if (pvh && subleaf == 0) {
            out[0] = XEN_HVM_CPUID_IOMMU_MAPPINGS | XEN_HVM_CPUID_VCPU_ID_PRESENT |
                     XEN_HVM_CPUID_DOMID_PRESENT | XEN_HVM_CPUID_UPCALL_VECTOR;
            out[1] = (uint32_t)v->id;
            out[2] = v->dom->domid;
        }
        break;
    case 5:                         /* PV: the widest machine address */
        if (!pvh && subleaf == 0) {
            __cpuid(0x80000008, host[0], host[1], host[2], host[3]);
            out[1] = host[0] & 0xff;
        }
        break;
    default:                        /* the rest of Xen's range reads as zeros */
        break;
    }
}
