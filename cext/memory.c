/*
 * memory.c - memory_op: the domain's memory map, reservation (balloon) and shared_info.
 *
 * The domain owns frames [0, nr_pages); nr_pages is also its maximum reservation. A
 * frame given back with decrease_reservation is released to the host (the process's
 * resident set really shrinks) and reads as zero when populated again. Page-table pool
 * frames, the shared_info frame and frames still mapped by a page table in use are
 * never released.
 *
 * Results follow Xen: the reservation sub-ops return the number of extents done, and
 * anything wrong with the request as a whole (unreadable arguments, another domain, an
 * extent order above a domU's limit) means none were done, not an errno. The low six
 * bits of cmd are the sub-op, the bits above it the extent to start from (Xen's
 * continuation encoding); sub-ops without extents refuse a start (-EINVAL).
 */
#define _GNU_SOURCE
#include <stdlib.h>
#include <string.h>
#include <fcntl.h>
#include <sys/mman.h>

#include "hv.h"

#define MEMOP_EXTENT_SHIFT  6
#define DOMU_MAX_ORDER      9       /* Xen's CONFIG_DOMU_MAX_ORDER: 2 MiB extents */

static int is_self(struct hv_domain *d, uint16_t domid)
{
    return domid == DOMID_SELF || domid == d->domid;
}

/* Give frames back to the host, so they cost no memory and read as zero next time:
 * RAM is a shared file mapping, so the pages go from the file, not just the mapping. */
static void discard_host(struct hv_domain *d, uint64_t gpfn, uint64_t n)
{
    fallocate(d->ram_fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
              (off_t)(gpfn << HV_PAGE_SHIFT), (off_t)(n << HV_PAGE_SHIFT));
}

static void set_populated(struct hv_domain *d, uint64_t gpfn, uint64_t n, int on)
{
    struct hv_mm *mm = &d->mm;
    for (uint64_t i = gpfn; i < gpfn + n; i++) {
        if (on)
            mm->frames[i].flags |= HV_FRAME_POPULATED;
        else
            mm->frames[i].flags &= ~HV_FRAME_POPULATED;
    }
    if (on)
        mm->nr_populated += n;
    else
        mm->nr_populated -= n;
}

static int in_range(const struct hv_mm *mm, uint64_t gpfn, uint64_t n)
{
    return gpfn < mm->nr_pages && n <= mm->nr_pages - gpfn;
}

/* Populate [gpfn, gpfn + n) if every frame of it is free and the maximum allows it. */
static int populate(struct hv_domain *d, uint64_t gpfn, uint64_t n)
{
    struct hv_mm *mm = &d->mm;
    if (!in_range(mm, gpfn, n) || mm->nr_populated + n > mm->nr_pages)
        return 0;
    for (uint64_t i = gpfn; i < gpfn + n; i++)
        if (mm->frames[i].flags & HV_FRAME_POPULATED)
            return 0;
    discard_host(d, gpfn, n);       /* zero, whatever touched it while it was free */
    set_populated(d, gpfn, n, 1);
    return 1;
}

/* Release [gpfn, gpfn + n) if every frame of it is the domain's plain, unmapped RAM. */
static int release(struct hv_domain *d, uint64_t gpfn, uint64_t n)
{
    struct hv_mm *mm = &d->mm;
    uint64_t shinfo = d->shared_info_gpa >> HV_PAGE_SHIFT;
    if (!in_range(mm, gpfn, n))
        return 0;
    for (uint64_t i = gpfn; i < gpfn + n; i++) {
        const struct hv_frame *f = &mm->frames[i];
        if (!(f->flags & HV_FRAME_POPULATED) || hv_mm_in_pool(mm, i) || f->map_count ||
            hv_gnt_frame_granted(d, i) ||
            f->type_count || (f->flags & (HV_FRAME_PINNED | HV_FRAME_SEG_DESC)) ||
            (d->shared_info_gpa != HV_NO_PAGE && i == shinfo))
            return 0;
    }
    set_populated(d, gpfn, n, 0);
    discard_host(d, gpfn, n);
    return 1;
}

/* An aligned block of 2^order free frames, searched from where the last one was found. */
static uint64_t find_free_block(struct hv_domain *d, uint64_t n)
{
    struct hv_mm *mm = &d->mm;
    uint64_t blocks = mm->nr_pages / n, first = (mm->alloc_hint / n) % (blocks ? blocks : 1);

    if (mm->nr_populated + n > mm->nr_pages)
        return HV_NO_FRAME;
    for (uint64_t k = 0; k < blocks; k++) {
        uint64_t gpfn = ((first + k) % blocks) * n, i;
        for (i = gpfn; i < gpfn + n; i++)
            if (mm->frames[i].flags & HV_FRAME_POPULATED)
                break;
        if (i == gpfn + n) {
            mm->alloc_hint = gpfn + n;
            return gpfn;
        }
    }
    return HV_NO_FRAME;
}

static int64_t reservation_op(struct hv_vcpu *v, unsigned op, uint64_t start, uint64_t arg)
{
    struct hv_domain *d = v->dom;
    struct xen_memory_reservation r;
    uint64_t i, gpfn, n;

    if (hv_copy_from_guest(v, &r, arg, sizeof(r)) < 0 ||
        r.nr_extents > (UINT32_MAX >> MEMOP_EXTENT_SHIFT) || start >= r.nr_extents ||
        !is_self(d, r.domid) || r.extent_order > DOMU_MAX_ORDER)
        return (int64_t)start;
    n = 1ULL << r.extent_order;
    /* Xen checks the list's address range up front (a null list is fine for increase). */
    if (!(op == XENMEM_increase_reservation && r.extent_start == 0) &&
        !hv_mm_range_ok(r.extent_start + start * 8, (r.nr_extents - start) * 8))
        return (int64_t)start;

    for (i = start; i < r.nr_extents; i++) {
        uint64_t slot = r.extent_start + i * 8;
        if (op == XENMEM_increase_reservation) {
            /* Any free frames; their number goes back to the guest. */
            gpfn = find_free_block(d, n);
            if (gpfn == HV_NO_FRAME || !populate(d, gpfn, n))
                break;
            if (r.extent_start && hv_copy_to_guest(v, slot, &gpfn, 8) < 0) {
                release(d, gpfn, n);
                break;
            }
            continue;
        }
        if (hv_copy_from_guest(v, &gpfn, slot, 8) < 0)
            break;
        if (op == XENMEM_decrease_reservation ? !release(d, gpfn, n) : !populate(d, gpfn, n))
            break;
    }
    return (int64_t)i;
}

static int64_t memory_map(struct hv_vcpu *v, uint64_t arg)
{
    struct xen_memory_map map;
    /* One RAM range: all of the domain's frames, the page-table pool included (the
     * guest reads its tables there; start_info says which frames they are). */
    struct e820_entry ram = {
        .addr_lo = 0, .addr_hi = 0,
        .size_lo = (uint32_t)v->dom->ram_bytes, .size_hi = (uint32_t)(v->dom->ram_bytes >> 32),
        .type = E820_RAM,
    };

    if (hv_copy_from_guest(v, &map, arg, sizeof(map)) < 0)
        return -XEN_EFAULT;
    /* Xen copies min(capacity, entries) and says how many; a small buffer is no error. */
    if (map.nr_entries > 1)
        map.nr_entries = 1;
    if ((map.nr_entries && hv_copy_to_guest(v, map.buffer, &ram, sizeof(ram)) < 0) ||
        hv_copy_to_guest(v, arg, &map, sizeof(map)) < 0)
        return -XEN_EFAULT;
    return 0;
}

/* Place shared_info in frame gpfn. It is one page that moves: the event service carries
 * its current contents over (hv_shared_info_placed), and the frame it leaves becomes
 * plain zeroed RAM again. */
static int64_t place_shared_info(struct hv_domain *d, uint64_t idx, uint64_t gpfn)
{
    uint64_t old = d->shared_info_gpa, gpa = gpfn << HV_PAGE_SHIFT;

    if (idx != 0 || !hv_mm_frame_usable(d, gpfn))
        return -XEN_EINVAL;
    if (old == gpa)
        return 0;
    memset(d->ram + gpa, 0, HV_PAGE_SIZE);
    __atomic_store_n(&d->shared_info_gpa, gpa, __ATOMIC_RELEASE);
    hv_shared_info_placed(d, old);
    if (old != HV_NO_PAGE)
        memset(d->ram + old, 0, HV_PAGE_SIZE);
    return 0;
}

int hv_domain_place_shared_info(struct hv_domain *d, uint64_t gpfn)
{
    return place_shared_info(d, 0, gpfn) < 0 ? -1 : 0;
}

static int64_t add_to_physmap(struct hv_vcpu *v, uint64_t start, uint64_t arg)
{
    struct xen_add_to_physmap xatp;

    if (start > 0xffff)
        return -XEN_EDOM;
    if (hv_copy_from_guest(v, &xatp, arg, sizeof(xatp)) < 0)
        return -XEN_EFAULT;
    if (xatp.space == XENMAPSPACE_gmfn_foreign)
        return -XEN_ENOSYS;         /* only through add_to_physmap_batch (Xen) */
    if (!is_self(v->dom, xatp.domid))
        return -XEN_ESRCH;
    switch (xatp.space) {
    case XENMAPSPACE_shared_info:
        return place_shared_info(v->dom, xatp.idx, xatp.gpfn);
    case XENMAPSPACE_grant_table:
        return hv_gnt_add_to_physmap(v->dom, xatp.idx, xatp.gpfn);
    case XENMAPSPACE_gmfn:
    case XENMAPSPACE_gmfn_range:
        return -XEN_ENOSYS;         /* moving frames around: not in trapless */
    }
    return -XEN_EINVAL;             /* Xen: no frame to map from that space */
}

int64_t do_memory_op(struct hv_vcpu *v, const struct hv_hcall *h)
{
    struct hv_domain *d = v->dom;
    unsigned op = (unsigned)(h->a1 & XENMEMOP_CMD_MASK);
    uint64_t start = h->a1 >> MEMOP_EXTENT_SHIFT;
    uint16_t domid;

    if (!d->mm.frames)
        return -XEN_ENOSYS;
    switch (op) {
    case XENMEM_increase_reservation:
    case XENMEM_decrease_reservation:
    case XENMEM_populate_physmap:
        return reservation_op(v, op, start, h->a2);
    case XENMEM_maximum_ram_page:
        return start ? -XEN_EINVAL : (int64_t)d->mm.nr_pages;
    case XENMEM_current_reservation:
    case XENMEM_maximum_reservation:
    case XENMEM_maximum_gpfn:
        if (start)
            return -XEN_EINVAL;
        if (hv_copy_from_guest(v, &domid, h->a2, sizeof(domid)) < 0)
            return -XEN_EFAULT;
        if (!is_self(d, domid))
            return -XEN_ESRCH;
        if (op == XENMEM_current_reservation)
            return (int64_t)d->mm.nr_populated;
        if (op == XENMEM_maximum_reservation)
            return (int64_t)d->mm.nr_pages;
        return (int64_t)d->mm.nr_pages - 1;
    case XENMEM_add_to_physmap:
        return add_to_physmap(v, start, h->a2);
    case XENMEM_machphys_mapping: {
        struct xen_machphys_mapping m;
        if (start || pv_machphys_mapping(d, &m) < 0)
            return -XEN_ENOSYS;
        return hv_copy_to_guest(v, h->a2, &m, sizeof(m)) < 0 ? -XEN_EFAULT : 0;
    }
    case XENMEM_memory_map:
        /* Xen hands this one the whole cmd: a start makes it an unknown command. */
        return start ? -XEN_ENOSYS : memory_map(v, h->a2);
    }
    return -XEN_ENOSYS;
}

uint64_t hv_domain_resident_pages(struct hv_domain *d)
{
    uint64_t n = d->ram_bytes >> HV_PAGE_SHIFT, resident = 0;
    unsigned char *vec = malloc(n);
    if (!vec)
        return ~0ULL;
    if (mincore(d->ram, d->ram_bytes, vec) < 0) {
        free(vec);
        return ~0ULL;
    }
    for (uint64_t i = 0; i < n; i++)
        resident += vec[i] & 1;
    free(vec);
    return resident;
}
