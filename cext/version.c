/*
 * version.c - xen_version: who the hypervisor says it is.
 *
 * trapless reports the Xen interface version it follows. Sub-ops Xen's default
 * policy keeps from unprivileged domains (commandline, build_id) are -EPERM here too,
 * since every trapless domain is unprivileged.
 */
#include <string.h>

#include "hv.h"

#define TRAPLESS_EXTRAVERSION ".0-trapless"
#define TRAPLESS_CHANGESET "trapless walking skeleton"
#define TRAPLESS_CAPABILITIES "xen-3.0-x86_64"
/* Where a 64-bit Xen reserves guest-virtual space for itself. */
#define TRAPLESS_VIRT_START 0xffff800000000000ULL

static int64_t copy_string(struct hv_vcpu *v, uint64_t arg, const char *s, size_t size)
{
    char buf[XEN_CAPABILITIES_INFO_LEN];
    memset(buf, 0, size);
    strncpy(buf, s, size - 1);
    return hv_copy_to_guest(v, arg, buf, size) < 0 ? -XEN_EFAULT : 0;
}

static uint32_t feature_submap(struct hv_vcpu *v, uint32_t idx)
{
    if (idx != 0)
        return 0;
    /* PVH: what Xen reports to an HVM container (common/kernel.c): the guest's page
     * tables are its own and translated, upcalls come on a vector, the PV clock is safe
     * to use. (Xen adds feature bits for sub-ops trapless does not have yet.) */
    if (v->dom->guest_type == HV_GUEST_PVH)
        return (1u << XENFEAT_writable_page_tables) | (1u << XENFEAT_auto_translated_physmap) |
               (1u << XENFEAT_hvm_callback_vector) | (1u << XENFEAT_hvm_safe_pvclock);
    /* Xen's PV CPU model: Xen's three PV bits (common/kernel.c), each of which trapless
     * has: preserve-A/D, mmuext_op's CLEAR_PAGE/COPY_PAGE, and grant maps that keep the
     * guest-available PTE bits (grant_table.c). Linux panics without the first and the
     * last. (Xen's PV set also names sub-ops trapless lacks: vNUMA, the phys areas.) */
    if (v->dom->pv_model == HV_PV_XEN)
        return (1u << XENFEAT_mmu_pt_update_preserve_ad) | (1u << XENFEAT_highmem_assist) |
               (1u << XENFEAT_gnttab_map_avail_bits);
    /* A ring-0 PV kernel runs in ring 0 of its own VM, and takes upcalls on a vector. */
    return (1u << XENFEAT_supervisor_mode_kernel) | (1u << XENFEAT_hvm_callback_vector);
}

int64_t do_xen_version(struct hv_vcpu *v, const struct hv_hcall *h)
{
    uint64_t arg = h->a2;

    switch ((int32_t)h->a1) {
    case XENVER_version:
        return (TRAPLESS_XEN_MAJOR << 16) | TRAPLESS_XEN_MINOR;
    case XENVER_extraversion:
        return copy_string(v, arg, TRAPLESS_EXTRAVERSION, XEN_EXTRAVERSION_LEN);
    case XENVER_compile_info: {
        struct xen_compile_info info;
        memset(&info, 0, sizeof(info));
        strncpy(info.compiler, "gcc " __VERSION__, sizeof(info.compiler) - 1);
        strncpy(info.compile_by, "trapless", sizeof(info.compile_by) - 1);
        strncpy(info.compile_domain, "localdomain", sizeof(info.compile_domain) - 1);
        strncpy(info.compile_date, __DATE__ " " __TIME__, sizeof(info.compile_date) - 1);
        return hv_copy_to_guest(v, arg, &info, sizeof(info)) < 0 ? -XEN_EFAULT : 0;
    }
    case XENVER_capabilities:
        return copy_string(v, arg, TRAPLESS_CAPABILITIES, XEN_CAPABILITIES_INFO_LEN);
    case XENVER_changeset:
        return copy_string(v, arg, TRAPLESS_CHANGESET, XEN_CHANGESET_INFO_LEN);
    case XENVER_platform_parameters: {
        struct xen_platform_parameters p = { .virt_start = TRAPLESS_VIRT_START };
        return hv_copy_to_guest(v, arg, &p, sizeof(p)) < 0 ? -XEN_EFAULT : 0;
    }
    case XENVER_get_features: {
        struct xen_feature_info fi;
        if (hv_copy_from_guest(v, &fi, arg, sizeof(fi)) < 0)
            return -XEN_EFAULT;
        if (fi.submap_idx >= XENFEAT_NR_SUBMAPS)
            return -XEN_EINVAL;
        fi.submap = feature_submap(v, fi.submap_idx);
        return hv_copy_to_guest(v, arg, &fi, sizeof(fi)) < 0 ? -XEN_EFAULT : 0;
    }
    case XENVER_pagesize:
        return HV_PAGE_SIZE;
    case XENVER_guest_handle:
        return hv_copy_to_guest(v, arg, v->dom->handle, 16) < 0 ? -XEN_EFAULT : 0;
    case XENVER_commandline:
    case XENVER_build_id:
        return -XEN_EPERM;
    default:
        return -XEN_ENOSYS;
    }
}
