/*
 * guest_mem.c - the one door to guest memory: translation through the guest's own
 * page tables, bounds checks against the domain's RAM, and copies in and out.
 *
 * A guest pointer is a guest virtual address. Every byte a hypercall reads or writes
 * goes through hv_copy_from_guest / hv_copy_to_guest, which walk the guest's 4-level
 * page tables exactly as the MMU would (present, writable, 2 MiB and 1 GiB pages) and
 * refuse anything outside the domain's RAM. A bad pointer is -XEN_EFAULT; nothing is
 * ever read or written outside [ram, ram + ram_bytes + gnt_bytes).
 */
#include <string.h>

#include "hv.h"

#define PTE_P    (1ULL << 0)
#define PTE_RW   (1ULL << 1)
#define PTE_PS   (1ULL << 7)
#define PTE_ADDR 0x000ffffffffff000ULL

static int read_pte(struct hv_domain *d, uint64_t table, unsigned idx, uint64_t *pte)
{
    uint64_t gpa = (table & PTE_ADDR) + idx * 8ULL;
    if (!hv_gpa_valid(d, gpa, 8))
        return -XEN_EFAULT;
    memcpy(pte, d->ram + gpa, 8);
    return 0;
}

static int canonical(uint64_t va)
{
    uint64_t top = va >> 47;
    return top == 0 || top == 0x1ffff;
}

int hv_gva_to_gpa(struct hv_vcpu *v, uint64_t gva, int write, uint64_t *gpa)
{
    struct hv_domain *d = v->dom;
    uint64_t entry, cr3;

    if (!v->ops)
        return -XEN_EFAULT;             /* a vCPU not brought up yet has no page tables */
    /* what the guest's own access would use, without a walk: most guest pointers (a
     * bounce frame, an iret frame, a hypercall's arguments) were just touched by it */
    if (v->ops->tlb_gpa && v->ops->tlb_gpa(v, gva, write, gpa) == 0)
        goto found;
    /* PVH: the guest sets its own mode; before paging is on, addresses are physical
     * (32 bits of them). Only 4-level paging is walked. */
    if (d->guest_type == HV_GUEST_PVH && v->ops->get_mode) {
        struct hv_cpu_mode m;
        if (v->ops->get_mode(v, &m) < 0)
            return -XEN_EFAULT;
        if (!(m.cr0 & (1ULL << 31))) {
            *gpa = gva & 0xffffffffULL;
            goto found;
        }
        if (!(m.efer & (1ULL << 10)))
            return -XEN_EFAULT;         /* 32-bit or PAE paging: not walked */
    }
    if (!canonical(gva))
        return -XEN_EFAULT;
    if (v->ops->get_cr3(v, &cr3) < 0)
        return -XEN_EFAULT;

    entry = cr3;
    for (int level = 4; level >= 1; level--) {
        unsigned shift = 12 + 9 * (level - 1);
        unsigned idx = (gva >> shift) & 511;
        if (read_pte(d, entry, idx, &entry) < 0)
            return -XEN_EFAULT;
        if (!(entry & PTE_P) || (write && !(entry & PTE_RW)))
            return -XEN_EFAULT;
        if ((level == 3 || level == 2) && (entry & PTE_PS)) {
            uint64_t size = 1ULL << shift;
            *gpa = (entry & PTE_ADDR & ~(size - 1)) | (gva & (size - 1));
            goto found;
        }
    }
    *gpa = (entry & PTE_ADDR) | (gva & 0xfff);
found:
    if (!hv_gpa_valid(d, *gpa, 1))
        return -XEN_EFAULT;
    /* Page tables are the hypervisor's to write: never through a guest pointer. */
    if (write && *gpa >= d->pt_pool_start && *gpa < d->pt_pool_end)
        return -XEN_EFAULT;
    return 0;
}

/* A buffer within one page that the engine's TLB holds (tlb_gpa) for the access:
 * where it is in RAM, else NULL (then walk). Most guest pointers are so: a bounce frame,
 * an iret frame, a hypercall's arguments, all just touched by the guest. The engine's
 * last page first (hv_tlb_page_hit): it was in RAM, and not a table if writable. */
static uint8_t *tlb_lookup(struct hv_vcpu *v, uint64_t gva, uint64_t len, int write)
{
    struct hv_domain *d = v->dom;
    uint64_t gpa;

    if (!v->ops || !v->ops->tlb_gpa || v->ops->tlb_gpa(v, gva, write, &gpa) < 0 ||
        !hv_gpa_valid(d, gpa, len) ||
        (write && gpa >= d->pt_pool_start && gpa < d->pt_pool_end))
        return NULL;
    return d->ram + gpa;
}

static inline uint8_t *in_tlb(struct hv_vcpu *v, uint64_t gva, uint64_t len, int write)
{
    uint64_t gpa;

    if (!len || ((gva ^ (gva + len - 1)) >> HV_PAGE_SHIFT))
        return NULL;
    if (hv_tlb_page_hit(v, gva, write, &gpa))
        return v->dom->ram + gpa;
    return tlb_lookup(v, gva, len, write);
}

/* Copy page by page: a buffer may straddle pages that map anywhere (or nowhere). */
static int copy_guest(struct hv_vcpu *v, uint64_t gva, uint8_t *host, uint64_t len, int write)
{
    while (len) {
        uint64_t gpa, chunk = HV_PAGE_SIZE - (gva & (HV_PAGE_SIZE - 1));
        if (chunk > len)
            chunk = len;
        if (hv_gva_to_gpa(v, gva, write, &gpa) < 0 || !hv_gpa_valid(v->dom, gpa, chunk))
            return -XEN_EFAULT;
        if (write)
            memcpy(v->dom->ram + gpa, host, chunk);
        else
            memcpy(host, v->dom->ram + gpa, chunk);
        gva += chunk;
        host += chunk;
        len -= chunk;
    }
    return 0;
}

int hv_copy_from_guest(struct hv_vcpu *v, void *dst, uint64_t gva, uint64_t len)
{
    uint8_t *at = in_tlb(v, gva, len, 0);

    if (at) {
        memcpy(dst, at, len);
        return 0;
    }
    return copy_guest(v, gva, dst, len, 0);
}

int hv_copy_to_guest(struct hv_vcpu *v, uint64_t gva, const void *src, uint64_t len)
{
    /* Check the whole range first so a fault half-way leaves guest memory untouched. */
    uint64_t gpa, end = gva + len, va = gva;
    uint8_t *at = in_tlb(v, gva, len, 1);

    if (at) {
        memcpy(at, src, len);
        return 0;
    }
    if (len && end < gva)
        return -XEN_EFAULT;
    /* within one page (a bounce frame, most results): one walk checks and places it */
    if (len && (gva >> HV_PAGE_SHIFT) == ((end - 1) >> HV_PAGE_SHIFT)) {
        if (hv_gva_to_gpa(v, gva, 1, &gpa) < 0 || !hv_gpa_valid(v->dom, gpa, len))
            return -XEN_EFAULT;
        memcpy(v->dom->ram + gpa, src, len);
        return 0;
    }
    while (len && va < end) {
        if (hv_gva_to_gpa(v, va, 1, &gpa) < 0)
            return -XEN_EFAULT;
        va = (va | (HV_PAGE_SIZE - 1)) + 1;
        if (va == 0)
            break;
    }
    if (len && hv_gva_to_gpa(v, end - 1, 1, &gpa) < 0)
        return -XEN_EFAULT;
    return copy_guest(v, gva, (uint8_t *)src, len, 1);
}
