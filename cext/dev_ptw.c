/*
 * dev_ptw.c - trapped page-table writes: how a native guest's direct PTE stores reach
 * the memory service.
 *
 * A native domain's page tables sit in the same read-only pool as a PV domain's
 * (builder.py); the guest maps them like any memory and stores to them, and each store
 * exits (KVM_EXIT_MMIO on the read-only memslot). Here it is validated and applied with
 * exactly the rules of one mmu_update request (mm.c), so a native guest can map nothing
 * a PV guest could not. A store narrower than 8 bytes is merged into its entry first;
 * one that straddles two entries is refused. A refused store is not made and the domain
 * crashes, as Xen crashes a guest that breaks its page-table rules; the store, its
 * value and the Xen errno are kept in the device statistics.
 */
#include <string.h>

#include "hv.h"

static void refuse(struct hv_devices *dev, uint64_t gpa, uint64_t val, int err)
{
    pthread_mutex_lock(&dev->lock);
    dev->stats.pte_rejected++;
    dev->stats.pte_last_gpa = gpa;
    dev->stats.pte_last_value = val;
    dev->stats.pte_last_error = err;
    pthread_mutex_unlock(&dev->lock);
    hv_domain_shutdown(dev->dom, SHUTDOWN_crash);
}

int hv_ptw_write(struct hv_devices *dev, uint64_t gpa, int size, const uint8_t *data)
{
    struct hv_domain *d = dev->dom;
    uint64_t entry_gpa = gpa & ~7ULL, val;
    int rc;

    if (size < 1 || size > 8 || (gpa & 7) + (uint64_t)size > 8) {
        memcpy(&val, data, 8);
        refuse(dev, gpa, size < 8 ? val & ((1ULL << (8 * size)) - 1) : val, -XEN_EINVAL);
        return 1;
    }
    /* The entry as it will read after the store: the old bytes around the new ones. */
    memcpy(&val, d->ram + entry_gpa, 8);
    memcpy((uint8_t *)&val + (gpa & 7), data, (size_t)size);
    rc = hv_mm_write_pte(d, entry_gpa, val);
    if (rc) {
        refuse(dev, entry_gpa, val, rc);
        return 1;
    }
    pthread_mutex_lock(&dev->lock);
    dev->stats.pte_writes++;
    pthread_mutex_unlock(&dev->lock);
    return 1;
}
