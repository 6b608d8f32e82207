/*
 * hypercall.c - the hypercall table: one handler per Xen hypercall number.
 *
 * Engines call hv_hypercall() with the guest's registers; the result goes back in
 * rax. A number with no handler is -XEN_ENOSYS. Counting happens here, once.
 */
#include <x86intrin.h>

#include "hv.h"

static void trace(struct hv_domain *d, const struct hv_hcall *h, int64_t ret);

typedef int64_t (*hv_handler)(struct hv_vcpu *v, const struct hv_hcall *h);

static const hv_handler hypercall_table[TRAPLESS_NR_HYPERCALLS] = {
    [__HYPERVISOR_mmu_update]  = do_mmu_update,
    [__HYPERVISOR_update_va_mapping] = do_update_va_mapping,
    [__HYPERVISOR_memory_op]   = do_memory_op,
    [__HYPERVISOR_multicall]   = do_multicall,
    [__HYPERVISOR_set_timer_op] = do_set_timer_op,
    [__HYPERVISOR_xen_version] = do_xen_version,
    [__HYPERVISOR_console_io]  = do_console_io,
    [__HYPERVISOR_vcpu_op]     = do_vcpu_op,
    [__HYPERVISOR_mmuext_op]   = do_mmuext_op,
    [__HYPERVISOR_grant_table_op] = do_grant_table_op,
    [__HYPERVISOR_sched_op]    = do_sched_op,
    [__HYPERVISOR_event_channel_op] = do_event_channel_op,
    [__HYPERVISOR_hvm_op]      = do_hvm_op,
    /* the PV CPU model (pv_traps.c); iret is taken before this table (pv_syscall),
     * except inside a multicall */
    [__HYPERVISOR_iret]        = do_iret_entry,
    [__HYPERVISOR_set_trap_table] = do_set_trap_table,
    [__HYPERVISOR_set_gdt]     = do_set_gdt,
    [__HYPERVISOR_update_descriptor] = do_update_descriptor,
    [__HYPERVISOR_stack_switch] = do_stack_switch,
    [__HYPERVISOR_set_callbacks] = do_set_callbacks,
    [__HYPERVISOR_callback_op] = do_callback_op,
    /* its control state (pv_ctrl.c) */
    [__HYPERVISOR_fpu_taskswitch] = do_fpu_taskswitch,
    [__HYPERVISOR_set_debugreg] = do_set_debugreg,
    [__HYPERVISOR_get_debugreg] = do_get_debugreg,
    [__HYPERVISOR_vm_assist]   = do_vm_assist,
    [__HYPERVISOR_physdev_op]  = do_physdev_op,
    [__HYPERVISOR_set_segment_base] = do_set_segment_base,
};

/* The hypercalls that change page tables, frame types or descriptor tables (and the
 * multicall, which may hold them) run one vCPU at a time under the domain's mm_lock. */
static const uint8_t takes_mm_lock[TRAPLESS_NR_HYPERCALLS] = {
    [__HYPERVISOR_mmu_update] = 1, [__HYPERVISOR_update_va_mapping] = 1,
    [__HYPERVISOR_memory_op] = 1, [__HYPERVISOR_multicall] = 1, [__HYPERVISOR_mmuext_op] = 1,
    [__HYPERVISOR_grant_table_op] = 1, [__HYPERVISOR_set_gdt] = 1,
    [__HYPERVISOR_update_descriptor] = 1, [__HYPERVISOR_vcpu_op] = 1,
};

int64_t hv_hypercall(struct hv_vcpu *v, const struct hv_hcall *h)
{
    struct hv_domain *d = v->dom;
    struct hv_counters *c = &d->counters;
    uint64_t slot = h->nr < TRAPLESS_NR_HYPERCALLS ? h->nr : TRAPLESS_NR_HYPERCALLS;
    hv_handler fn = slot < TRAPLESS_NR_HYPERCALLS ? hypercall_table[slot] : NULL;
    int lock = slot < TRAPLESS_NR_HYPERCALLS && takes_mm_lock[slot];
    int64_t ret;

    if (lock)
        pthread_mutex_lock(&d->mm_lock);
    ret = fn ? fn(v, h) : -XEN_ENOSYS;
    if (lock)
        pthread_mutex_unlock(&d->mm_lock);
    __atomic_fetch_add(&c->hypercalls[slot], 1, __ATOMIC_RELAXED);     /* vCPUs at once */
    if (ret < 0 && ret >= -4095)
        __atomic_fetch_add(&c->hypercall_errors[slot], 1, __ATOMIC_RELAXED);
    trace(d, h, ret);
    return ret;
}

/* vCPU threads take a seq each; a reader copies entries and keeps those whose seq
 * still matches after the copy (a torn one was being overwritten). */
static void trace(struct hv_domain *d, const struct hv_hcall *h, int64_t ret)
{
    uint64_t seq = __atomic_add_fetch(&d->trace_next, 1, __ATOMIC_RELAXED);
    struct hv_trace_entry *e = &d->trace[seq % HV_TRACE_ENTRIES];

    __atomic_store_n(&e->seq, 0, __ATOMIC_RELEASE);
    /* the TSC, read in a few cycles (clock_gettime took a sixth of bt's null
     * hypercall); hv_domain_trace turns it into system time. The host's TSC runs at a
     * constant rate (constant_tsc, nonstop_tsc), as the PV clock assumes too. */
    e->time_ns = __rdtsc();
    e->nr = h->nr;
    e->args[0] = h->a1;
    e->args[1] = h->a2;
    e->args[2] = h->a3;
    e->args[3] = h->a4;
    e->args[4] = h->a5;
    e->ret = ret;
    __atomic_store_n(&e->seq, seq, __ATOMIC_RELEASE);
    /* the newest seq written (two vCPUs may finish out of order) */
    uint64_t last = __atomic_load_n(&d->trace_seq, __ATOMIC_RELAXED);
    while (last < seq && !__atomic_compare_exchange_n(&d->trace_seq, &last, seq, 0,
                                                      __ATOMIC_RELEASE, __ATOMIC_RELAXED))
        ;
}

/* A TSC value trace() took as system time: between the domain's making and now, by
 * the two pairs of readings. */
static uint64_t trace_time(const struct hv_domain *d, uint64_t tsc, uint64_t tsc_now,
                           uint64_t ns_now)
{
    uint64_t ticks = tsc_now - d->trace_tsc0;
    if (tsc <= d->trace_tsc0 || ticks == 0)
        return d->trace_ns0;
    return d->trace_ns0 + (uint64_t)((unsigned __int128)(tsc - d->trace_tsc0) *
                                     (ns_now - d->trace_ns0) / ticks);
}

int hv_domain_trace(struct hv_domain *d, struct hv_trace_entry *out, int max)
{
    uint64_t last = __atomic_load_n(&d->trace_seq, __ATOMIC_ACQUIRE);
    uint64_t first = last > HV_TRACE_ENTRIES ? last - HV_TRACE_ENTRIES + 1 : 1;
    uint64_t tsc_now = __rdtsc(), ns_now = hv_now_ns();
    int n = 0;

    if (max > 0 && last - first + 1 > (uint64_t)max)
        first = last - (uint64_t)max + 1;
    for (uint64_t seq = first; seq <= last && n < max; seq++) {
        const struct hv_trace_entry *e = &d->trace[seq % HV_TRACE_ENTRIES];
        out[n] = *e;
        if (__atomic_load_n(&e->seq, __ATOMIC_ACQUIRE) == seq && out[n].seq == seq) {
            out[n].time_ns = trace_time(d, out[n].time_ns, tsc_now, ns_now);
            n++;
        }
    }
    return n;
}

int hv_hypercall_implemented(uint32_t nr)
{
    return nr < TRAPLESS_NR_HYPERCALLS && hypercall_table[nr] != NULL;
}
