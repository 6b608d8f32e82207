/*
 * pv_desc.c - the guest's descriptor tables under Xen's PV CPU model: set_gdt (2),
 * update_descriptor (10) and MMUEXT_SET_LDT.
 *
 * The real GDT is the hypervisor's (pv_region.c): its first 14 pages map the frames the
 * guest names with set_gdt, read-only, and its 15th is Xen's own. A frame given to
 * set_gdt must be the guest's, mapped nowhere writable, and hold only descriptors a PV
 * kernel may use (Xen's check_descriptor, XEN-ABI-FACTS §22); while it is part of the
 * GDT the memory service refuses writable mappings of it (HV_FRAME_SEG_DESC). The LDT
 * is the same: its frames (those covering nr_ents descriptors from a page-aligned guest
 * address) are checked and mapped read-only at PV_LDT_VA; Xen maps them when first
 * used, trapless when they are named, so a bad one is -EINVAL at once.
 */
#include <stdlib.h>
#include <string.h>

#include "hv.h"

#define DESC_S      (1ULL << 44)            /* code or data, not a system descriptor */
#define DESC_DPL    (3ULL << 45)
#define DESC_P      (1ULL << 47)
#define DESC_TYPE(d) (((d) >> 40) & 0xf)
#define SYS_CALL_GATE 0xc

/* Xen's check_descriptor for a 64-bit guest: 0 (maybe adjusted in *d) or -1. */
static int check_descriptor(uint64_t *d)
{
    uint64_t desc = *d;

    if (!(desc & DESC_P))
        return 0;                           /* not present: kept as it is */
    if (desc & DESC_S) {
        *d = desc | DESC_DPL;               /* code or data: the guest kernel is ring 3 */
        return 0;
    }
    if (DESC_TYPE(desc) == 0)
        return 0;
    if (DESC_TYPE(desc) == SYS_CALL_GATE) {
        /* the target must be the guest's own GDT, Xen's flat code selector or the LDT;
         * stored with DPL 0, so using it is a #GP the guest handles */
        uint16_t sel = (uint16_t)(desc >> 16);
        if ((sel >> 3) >= FIRST_RESERVED_GDT_ENTRY && sel != FLAT_KERNEL_CS && !(sel & 4))
            return -1;
        *d = desc & ~DESC_DPL;
        return 0;
    }
    return -1;                              /* TSS, LDT, interrupt and trap gates */
}

static void mark_desc_frames(struct hv_vcpu *v, const uint64_t *old, unsigned n_old);

int64_t do_set_gdt(struct hv_vcpu *v, const struct hv_hcall *h)
{
    uint64_t entries = h->a2, frames[FIRST_RESERVED_GDT_PAGE];

    if (v->dom->pv_model != HV_PV_XEN)
        return -XEN_ENOSYS;
    if (entries > FIRST_RESERVED_GDT_ENTRY)
        return -XEN_EINVAL;
    if (hv_copy_from_guest(v, frames, h->a1, (entries + 511) / 512 * sizeof(uint64_t)) < 0)
        return -XEN_EFAULT;
    return pv_set_gdt(v, frames, entries, 1);
}

/* Xen's pv_set_gdt: the frames holding `entries` descriptors become v's GDT; `load`:
 * v is the vCPU running now, whose real GDT maps them at once (a vCPU that never ran
 * gets them mapped when it first runs). 0 or -errno, nothing changed on failure. */
int pv_set_gdt(struct hv_vcpu *v, const uint64_t *frames, uint64_t entries, int load)
{
    struct hv_domain *d = v->dom;
    struct hv_mm *mm = &d->mm;
    uint64_t (*checked)[512];
    unsigned n;

    if (entries > FIRST_RESERVED_GDT_ENTRY)
        return -XEN_EINVAL;
    n = (unsigned)((entries + 511) / 512);
    checked = malloc(n * HV_PAGE_SIZE + 1);
    if (!checked)
        return -XEN_ENOMEM;
    /* check everything before changing anything */
    for (unsigned i = 0; i < n; i++) {
        int bad = !hv_mm_frame_usable(d, frames[i]) || mm->frames[frames[i]].wmap_count ||
                  hv_mm_seal_frame(d, frames[i]) < 0;
        if (!bad) {
            memcpy(checked[i], d->ram + (frames[i] << HV_PAGE_SHIFT), HV_PAGE_SIZE);
            for (int e = 0; e < 512 && !bad; e++)
                bad = check_descriptor(&checked[i][e]) < 0;
        }
        if (bad) {
            free(checked);
            return -XEN_EINVAL;
        }
    }
    uint64_t old[FIRST_RESERVED_GDT_PAGE];
    unsigned n_old = v->pv.gdt_nr_frames;
    memcpy(old, v->pv.gdt_frames, sizeof(old));
    for (unsigned i = 0; i < n; i++) {
        memcpy(d->ram + (frames[i] << HV_PAGE_SHIFT), checked[i], HV_PAGE_SIZE);
        v->pv.gdt_frames[i] = frames[i];
    }
    free(checked);
    v->pv.gdt_nr_frames = n;
    mark_desc_frames(v, old, n_old);
    if (!load)
        return 0;
    pv_map_gdt(v, v->pv.gdt_frames, n);
    return v->ops->flush_tlb(v) < 0 ? -XEN_EIO : 0;
}

/* Xen's pv_destroy_gdt for a vCPU that is not running: its frames are plain again. */
void pv_drop_gdt(struct hv_vcpu *v)
{
    uint64_t old[FIRST_RESERVED_GDT_PAGE];
    unsigned n_old = v->pv.gdt_nr_frames;

    memcpy(old, v->pv.gdt_frames, sizeof(old));
    memset(v->pv.gdt_frames, 0, sizeof(v->pv.gdt_frames));
    v->pv.gdt_nr_frames = 0;
    mark_desc_frames(v, old, n_old);
}

/* update_descriptor(ma, desc): one descriptor, checked as set_gdt checks them, stored
 * at machine address ma, 8-aligned, in a frame of the guest that is not a page table:
 * a GDT frame, or one that could be mapped writable. */
int64_t do_update_descriptor(struct hv_vcpu *v, const struct hv_hcall *h)
{
    struct hv_domain *d = v->dom;
    uint64_t ma = h->a1, desc = h->a2;

    if (d->pv_model != HV_PV_XEN)
        return -XEN_ENOSYS;
    if ((ma & 7) || !hv_mm_frame_usable(d, ma >> HV_PAGE_SHIFT) || check_descriptor(&desc) < 0)
        return -XEN_EINVAL;
    __atomic_store_n((uint64_t *)(d->ram + ma), desc, __ATOMIC_RELEASE);
    return 0;
}

/* The frames of the guest's descriptor tables take HV_FRAME_SEG_DESC; a frame may be in
 * both the GDT and the LDT, of this vCPU or another, so the flag is recomputed from all. */
static void mark_desc_frames(struct hv_vcpu *v, const uint64_t *old, unsigned n_old)
{
    struct hv_mm *mm = &v->dom->mm;
    for (unsigned i = 0; i < n_old; i++)
        mm->frames[old[i]].flags &= (uint8_t)~HV_FRAME_SEG_DESC;
    for (int id = 0; id < HV_MAX_VCPUS; id++) {
        const struct hv_vcpu *u = v->dom->vcpus[id];
        if (!u)
            continue;
        for (unsigned i = 0; i < u->pv.gdt_nr_frames; i++)
            mm->frames[u->pv.gdt_frames[i]].flags |= HV_FRAME_SEG_DESC;
        for (unsigned i = 0; i < u->pv.ldt_nr_frames; i++)
            mm->frames[u->pv.ldt_frames[i]].flags |= HV_FRAME_SEG_DESC;
    }
}

int pv_set_ldt(struct hv_vcpu *v, uint64_t base, uint64_t ents)
{
    struct hv_domain *d = v->dom;
    struct hv_mm *mm = &d->mm;
    uint64_t frames[PV_LDT_PAGES], old[PV_LDT_PAGES], page[512];
    unsigned n = (unsigned)((ents * 8 + HV_PAGE_SIZE - 1) / HV_PAGE_SIZE), n_old;

    /* Xen: page-aligned, a guest address, at most 8192 entries */
    if ((base & (HV_PAGE_SIZE - 1)) || ents > 8192 ||
        (base >= (1ULL << 47) && base < HYPERVISOR_VIRT_END))
        return -XEN_EINVAL;
    for (unsigned i = 0; i < n; i++) {
        uint64_t gpa, mfn;
        if (hv_gva_to_gpa(v, base + i * HV_PAGE_SIZE, 0, &gpa) < 0)
            return -XEN_EINVAL;
        mfn = gpa >> HV_PAGE_SHIFT;
        if (!hv_mm_frame_usable(d, mfn) || mm->frames[mfn].wmap_count ||
            hv_mm_seal_frame(d, mfn) < 0)
            return -XEN_EINVAL;
        memcpy(page, d->ram + (mfn << HV_PAGE_SHIFT), HV_PAGE_SIZE);
        for (int e = 0; e < 512; e++)
            if (check_descriptor(&page[e]) < 0)
                return -XEN_EINVAL;
        frames[i] = mfn;
    }
    /* all checked: adjust the descriptors (DPLs), then switch */
    for (unsigned i = 0; i < n; i++) {
        uint64_t *t = (uint64_t *)(d->ram + (frames[i] << HV_PAGE_SHIFT));
        for (int e = 0; e < 512; e++) {
            uint64_t desc = t[e];
            check_descriptor(&desc);
            if (desc != t[e])
                __atomic_store_n(&t[e], desc, __ATOMIC_RELEASE);
        }
    }
    n_old = v->pv.ldt_nr_frames;
    memcpy(old, v->pv.ldt_frames, sizeof(old));
    memcpy(v->pv.ldt_frames, frames, n * sizeof(uint64_t));
    v->pv.ldt_nr_frames = n;
    v->pv.ldt_base = base;
    v->pv.ldt_ents = ents;
    mark_desc_frames(v, old, n_old);
    pv_map_ldt(v, frames, n, ents);
    v->pv.hw_dirty = 1;                 /* the engine loads LDTR */
    return v->ops->flush_tlb(v) < 0 ? -XEN_EIO : 0;
}
