/*
 * sched.c - sched_op: yield, shutdown and the latched shutdown code.
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
            d->vcpus[i]->ops->kick(d->vcpus[i]);
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

int64_t do_sched_op(struct hv_vcpu *v, const struct hv_hcall *h)
{
    uint32_t reason;
    int rc;

    switch ((int32_t)h->a1) {
    case SCHEDOP_yield:
        sched_yield();
        return 0;
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
