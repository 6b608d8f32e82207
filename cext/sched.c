/*
 * sched.c - sched_op: yield, block, poll, shutdown and the latched shutdown code.
 *
 * block and poll park the vCPU (vcpu.c): the hypercall returns 0 at once, the engine
 * leaves the guest, and the scheduler runs the vCPU again only when an event arrives, a
 * deadline passes, or the toolstack stops it. Until then it holds no thread.
 */
#include <sched.h>

#include "hv.h"

void hv_domain_shutdown(struct hv_domain *d, int reason)
{
    if (d->shutting_down)
        return;
    /* A code latched with SCHEDOP_shutdown_code wins over the reason given now. */
    d->shutdown_reason = d->shutdown_code >= 0 ? d->shutdown_code : reason;
    __atomic_store_n(&d->shutting_down, 1, __ATOMIC_RELEASE);
    for (int i = 0; i < HV_MAX_VCPUS; i++)
        if (d->vcpus[i])
            hv_vcpu_notify(d->vcpus[i]);
}

static int read_reason(struct hv_vcpu *v, uint64_t arg, uint32_t *reason)
{
    struct sched_shutdown s;
    if (hv_copy_from_guest(v, &s, arg, sizeof(s)) < 0)
        return -XEN_EFAULT;
    if (s.reason > SHUTDOWN_soft_reset)
        return -XEN_EINVAL;
    *reason = s.reason;
    return 0;
}

static int64_t sched_block(struct hv_vcpu *v)
{
    /* Re-enable upcalls and wait until one is pending (Xen's SCHEDOP_block): a guest
     * that checked its condition with upcalls masked loses no event in between. */
    __atomic_store_n(&hv_vcpu_info(v)->evtchn_upcall_mask, 0, __ATOMIC_SEQ_CST);
    v->dom->counters.blocks++;
    hv_vcpu_park(v, HV_WAIT_UPCALL, 0);
    return 0;
}

static int64_t sched_poll(struct hv_vcpu *v, uint64_t arg)
{
    struct sched_poll sp;
    struct hv_poll_set ps;

    if (hv_copy_from_guest(v, &sp, arg, sizeof(sp)) < 0)
        return -XEN_EFAULT;
    if (sp.nr_ports > HV_MAX_POLL_PORTS)
        return -XEN_EINVAL;
    if (hv_copy_from_guest(v, ps.ports, sp.ports, sp.nr_ports * sizeof(uint32_t)) < 0)
        return -XEN_EFAULT;
    ps.n = sp.nr_ports;
    for (uint32_t i = 0; i < ps.n; i++)
        if (ps.ports[i] >= v->dom->max_ports)
            return -XEN_EINVAL;
    v->dom->counters.blocks++;
    v->poll = ps;
    hv_vcpu_park(v, HV_WAIT_POLL, sp.timeout);
    return 0;
}

int64_t do_sched_op(struct hv_vcpu *v, const struct hv_hcall *h)
{
    uint32_t reason;
    int rc;

    switch ((int32_t)h->a1) {
    case SCHEDOP_yield:
        sched_yield();
        return 0;
    case SCHEDOP_block:
        return sched_block(v);
    case SCHEDOP_poll:
        return sched_poll(v, h->a2);
    case SCHEDOP_shutdown:
        if ((rc = read_reason(v, h->a2, &reason)) < 0)
            return rc;
        hv_domain_shutdown(v->dom, reason);
        return 0;
    case SCHEDOP_shutdown_code:
        if ((rc = read_reason(v, h->a2, &reason)) < 0)
            return rc;
        if (v->dom->shutdown_code < 0)
            v->dom->shutdown_code = reason;
        return 0;
    default:
        return -XEN_ENOSYS;
    }
}
