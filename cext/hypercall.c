/*
 * hypercall.c - the hypercall table: one handler per Xen hypercall number.
 *
 * Engines call hv_hypercall() with the guest's registers; the result goes back in
 * rax. A number with no handler is -XEN_ENOSYS. Counting happens here, once.
 */
#include "hv.h"

typedef int64_t (*hv_handler)(struct hv_vcpu *v, const struct hv_hcall *h);

static const hv_handler hypercall_table[TRAPLESS_NR_HYPERCALLS] = {
    [__HYPERVISOR_mmu_update]  = do_mmu_update,
    [__HYPERVISOR_memory_op]   = do_memory_op,
    [__HYPERVISOR_multicall]   = do_multicall,
    [__HYPERVISOR_set_timer_op] = do_set_timer_op,
    [__HYPERVISOR_xen_version] = do_xen_version,
    [__HYPERVISOR_console_io]  = do_console_io,
    [__HYPERVISOR_vcpu_op]     = do_vcpu_op,
    [__HYPERVISOR_mmuext_op]   = do_mmuext_op,
    [__HYPERVISOR_sched_op]    = do_sched_op,
    [__HYPERVISOR_event_channel_op] = do_event_channel_op,
    [__HYPERVISOR_hvm_op]      = do_hvm_op,
};

int64_t hv_hypercall(struct hv_vcpu *v, const struct hv_hcall *h)
{
    struct hv_counters *c = &v->dom->counters;
    uint64_t slot = h->nr < TRAPLESS_NR_HYPERCALLS ? h->nr : TRAPLESS_NR_HYPERCALLS;
    hv_handler fn = slot < TRAPLESS_NR_HYPERCALLS ? hypercall_table[slot] : NULL;
    int64_t ret = fn ? fn(v, h) : -XEN_ENOSYS;

    c->hypercalls[slot]++;
    if (ret < 0 && ret >= -4095)
        c->hypercall_errors[slot]++;
    return ret;
}

int hv_hypercall_implemented(uint32_t nr)
{
    return nr < TRAPLESS_NR_HYPERCALLS && hypercall_table[nr] != NULL;
}
