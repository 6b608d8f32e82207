/*
 * multicall.c - multicall: a batch of hypercalls for the price of one exit.
 *
 * Each entry goes through the ordinary dispatcher (so it is counted under its own
 * number) and its result is written back into the entry, in order. As in Xen a
 * multicall inside a multicall is refused (-EINVAL as that entry's result) rather than
 * nested, and an unreadable entry stops the batch with -EFAULT.
 */
#include <stddef.h>

#include "hv.h"

/* Per vCPU thread: set while that vCPU runs the entries of a multicall. */
static __thread int in_multicall;

int64_t do_multicall(struct hv_vcpu *v, const struct hv_hcall *h)
{
    uint64_t list = h->a1;
    uint32_t nr = (uint32_t)h->a2;
    struct multicall_entry e;
    int64_t rc = 0;

    if (in_multicall)
        return -XEN_EINVAL;
    if (!hv_mm_range_ok(list, (uint64_t)nr * sizeof(e)))
        return -XEN_EFAULT;
    in_multicall = 1;
    for (uint32_t i = 0; i < nr; i++) {
        uint64_t at = list + (uint64_t)i * sizeof(e);
        if (hv_copy_from_guest(v, &e, at, sizeof(e)) < 0) {
            rc = -XEN_EFAULT;
            break;
        }
        struct hv_hcall call = {
            .nr = e.op, .a1 = e.args[0], .a2 = e.args[1], .a3 = e.args[2],
            .a4 = e.args[3], .a5 = e.args[4],
        };
        e.result = hv_hypercall(v, &call);
        if (v->pv.iret_done) {
            /* an iret ends the multicall: the vCPU is already elsewhere */
            hv_copy_to_guest(v, at + offsetof(struct multicall_entry, result), &e.result,
                             sizeof(e.result));
            break;
        }
        if (hv_copy_to_guest(v, at + offsetof(struct multicall_entry, result), &e.result,
                             sizeof(e.result)) < 0) {
            rc = -XEN_EFAULT;
            break;
        }
    }
    in_multicall = 0;
    return rc;
}
