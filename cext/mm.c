/*
 * mm.c - PV page tables: frame types and counts, mmu_update and mmuext_op.
 *
 * The guest writes no page table itself: they sit in the read-only pool and change only
 * here. Xen's invariants, kept per frame (mm.h): a page-table frame is in the pool and
 * is never mapped writable; a frame outside the pool is never a page table; a present
 * entry of a table in use maps only populated frames of this domain, with flags a PV
 * domU may use; an upper-level entry points at a table of the next level down, which
 * it holds in use. Accessed (and dirty) are forced on in every present entry written,
 * so the CPU never has to write a pool frame itself. As in Xen, the guest flushes its
 * TLB (mmuext_op) after changing mappings in use; a stale translation can only reach
 * what the guest could reach before, and never a pool frame for writing.
 *
 * Errors are Xen's: a bad flag or a table of the wrong type or place is -EINVAL; an
 * L1 entry naming a frame outside the domain's RAM is -EPERM (Xen: "non-privileged
 * attempt to map MMIO space"); one naming a frame the domain does not hold, or a page
 * table writable, is -EBUSY (Xen's failed get_page / get_page_type). A rejected update
 * changes nothing and stops the batch.
 */
#include <stdlib.h>
#include <string.h>

#include "hv.h"

#define PTE_P          (1ULL << 0)
#define PTE_RW         (1ULL << 1)
#define PTE_US         (1ULL << 2)
#define PTE_A          (1ULL << 5)
#define PTE_D          (1ULL << 6)
#define PTE_G          (1ULL << 8)
#define PTE_AVAIL      (7ULL << 9)
#define PTE_AVAIL_HIGH (0x7ffULL << 52)
#define PTE_NX         (1ULL << 63)
#define PTE_ADDR       0x000ffffffffff000ULL

/* What a PV domU may set, as Xen's base_disallow_mask: no cache attributes (PWT, PCD,
 * PAT), no superpages (PS), and global only in L1 entries. */
#define UPPER_ALLOWED  (PTE_P | PTE_RW | PTE_US | PTE_A | PTE_D | PTE_AVAIL | \
                        PTE_AVAIL_HIGH | PTE_NX | PTE_ADDR)
#define L1_ALLOWED     (UPPER_ALLOWED | PTE_G)

#define ENTRIES 512
#define PTE_KERNEL_PAGE (1ULL << 52)    /* Xen's mark on a kernel page it made user-visible */

/* Under Xen's PV CPU model the guest kernel runs in ring 3, so every present entry
 * must allow user access: Xen adds US (and marks L1 pages the guest left without it). */
static uint64_t adjust_entry(const struct hv_domain *d, int level, uint64_t e)
{
    if (d->pv_model != HV_PV_XEN || !(e & PTE_P) || (e & PTE_US))
        return e;
    return e | PTE_US | (level == 1 ? PTE_KERNEL_PAGE : 0);
}

/* L4 slots 256-271 belong to the hypervisor in Xen's model: guest entries there are
 * neither used nor counted; validation writes the hypervisor's own. */
static int xen_slot(const struct hv_domain *d, int level, int index)
{
    return level == 4 && d->pv_model == HV_PV_XEN && pv_xen_l4_slot(index);
}

int hv_mm_in_pool(const struct hv_mm *mm, uint64_t mfn)
{
    return mfn >= mm->pool_first && mfn < mm->pool_end;
}

/* Where page tables may live. trapless's ring-0 kernels keep them in the pool, which
 * is read-only to them (their kernel could otherwise load any frame into CR3). Under
 * Xen's model the kernel cannot load CR3, so, as in Xen, any frame of the domain may
 * become a table: its type protects it (never mapped writable while it is one). */
static int may_hold_table(const struct hv_domain *d, uint64_t mfn)
{
    return d->pv_model == HV_PV_XEN || hv_mm_in_pool(&d->mm, mfn);
}

int hv_mm_frame_usable(struct hv_domain *d, uint64_t gpfn)
{
    const struct hv_mm *mm = &d->mm;
    return mm->frames && gpfn < mm->nr_pages && !hv_mm_in_pool(mm, gpfn) &&
           (mm->frames[gpfn].flags & HV_FRAME_POPULATED) && !mm->frames[gpfn].type_count;
}

/* Xen's guest_handle_okay: the whole range lies in one canonical half. */
int hv_mm_range_ok(uint64_t gva, uint64_t len)
{
    uint64_t last = gva + len - 1;
    if (len == 0)
        return 1;
    if (last < gva)
        return 0;
    return ((gva >> 47) == 0 && (last >> 47) == 0) ||
           ((gva >> 47) == 0x1ffff && (last >> 47) == 0x1ffff);
}

static uint64_t *table_of(struct hv_domain *d, uint64_t mfn)
{
    return (uint64_t *)(d->ram + (mfn << HV_PAGE_SHIFT));
}

static int take_table(struct hv_domain *d, uint64_t mfn, int type);
static void drop_table(struct hv_domain *d, uint64_t mfn);

/* Take the reference a present entry of a level-`level` table holds on what it names. */
static int take_entry(struct hv_domain *d, int level, uint64_t e)
{
    struct hv_mm *mm = &d->mm;
    uint64_t mfn = (e & PTE_ADDR) >> HV_PAGE_SHIFT;
    struct hv_frame *f;

    if (!(e & PTE_P))
        return 0;
    if (e & ~(level == 1 ? L1_ALLOWED : UPPER_ALLOWED))
        return -XEN_EINVAL;
    if (level > 1)
        return take_table(d, mfn, level - 1);
    if (hv_gnt_in_region(d, mfn))
        return hv_gnt_frame_take(d, mfn);  /* the grant table's own frames */
    if (mfn >= mm->nr_pages)
        return -XEN_EPERM;
    f = &mm->frames[mfn];
    if (!(f->flags & HV_FRAME_POPULATED))
        return -XEN_EBUSY;
    if ((e & PTE_RW) && (hv_mm_in_pool(mm, mfn) || (f->flags & HV_FRAME_SEG_DESC) ||
                         f->type_count))
        return -XEN_EBUSY;              /* a page table or descriptor table, writable */
    f->map_count++;
    if (e & PTE_RW)
        f->wmap_count++;
    return 0;
}

static void drop_entry(struct hv_domain *d, int level, uint64_t e)
{
    uint64_t mfn = (e & PTE_ADDR) >> HV_PAGE_SHIFT;
    struct hv_frame *f;

    if (!(e & PTE_P))
        return;
    if (level > 1) {
        drop_table(d, mfn);
        return;
    }
    if (hv_gnt_in_region(d, mfn)) {
        hv_gnt_frame_drop(d, mfn);
        return;
    }
    f = &d->mm.frames[mfn];
    f->map_count--;
    if ((e & PTE_RW) && --f->wmap_count == 0)
        f->flags |= HV_FRAME_WAS_WRITABLE;
}

int hv_mm_seal_frame(struct hv_domain *d, uint64_t mfn)
{
    struct hv_frame *f = &d->mm.frames[mfn];
    struct hv_vcpu *v = d->vcpus[0];

    if (!(f->flags & HV_FRAME_WAS_WRITABLE))
        return 0;
    /* The vCPU doing this (vCPU 0 for the builder) and every other one drop their TLB,
     * so that no stale writable entry survives anywhere (the caller holds mm_lock). */
    for (int i = 0; i < HV_MAX_VCPUS; i++)
        if (d->vcpus[i] && pthread_equal(d->vcpus[i]->thread, pthread_self()))
            v = d->vcpus[i];
    if (v && (v->ops->flush_tlb(v) < 0 || hv_vcpu_flush_others(v) < 0))
        return -1;
    for (uint64_t i = 0; i < d->mm.nr_pages; i++)
        d->mm.frames[i].flags &= (uint8_t)~HV_FRAME_WAS_WRITABLE;
    return 0;
}

/* Check every entry of a table about to come into use, taking their references; on the
 * first bad entry give back what was taken and fail with its error. */
static int validate_table(struct hv_domain *d, uint64_t mfn, int level)
{
    uint64_t *t = table_of(d, mfn);
    uint64_t ad = level == 1 ? PTE_A | PTE_D : PTE_A;
    for (int i = 0; i < ENTRIES; i++) {
        int rc = xen_slot(d, level, i) ? 0 : take_entry(d, level, t[i]);
        if (rc) {
            while (i--)
                if (!xen_slot(d, level, i))
                    drop_entry(d, level, t[i]);
            return rc;
        }
    }
    /* Entries written before the table was in use may lack accessed/dirty; the CPU
     * must not be left to set them in a frame it cannot write. */
    for (int i = 0; i < ENTRIES; i++) {
        uint64_t e = adjust_entry(d, level, t[i]);
        if (xen_slot(d, level, i))
            e = pv_l4_entry(i);
        else if ((e & PTE_P) && (e & ad) != ad)
            e |= ad;
        if (e != t[i])
            __atomic_store_n(&t[i], e, __ATOMIC_RELAXED);
    }
    return 0;
}

/* One more use of frame mfn as a table of the given level; the first use validates it. */
static int take_table(struct hv_domain *d, uint64_t mfn, int type)
{
    struct hv_mm *mm = &d->mm;
    struct hv_frame *f;
    int rc;

    if (mfn >= mm->nr_pages || !may_hold_table(d, mfn))
        return -XEN_EINVAL;
    f = &mm->frames[mfn];
    if (!(f->flags & HV_FRAME_POPULATED))
        return -XEN_EINVAL;
    if (f->type_count) {
        if (f->type != type)
            return -XEN_EINVAL;
        f->type_count++;
        return 0;
    }
    /* A frame mapped writable, or a descriptor table, cannot take a table's type. */
    if (f->wmap_count || (f->flags & HV_FRAME_SEG_DESC))
        return -XEN_EINVAL;
    if (hv_mm_seal_frame(d, mfn) < 0)
        return -XEN_EIO;
    /* Claim the type before looking inside: a table reachable from itself would then be
     * met at another level and refused, so validation always ends. */
    f->type = (uint8_t)type;
    f->type_count = 1;
    rc = validate_table(d, mfn, type);
    if (rc) {
        f->type = HV_FT_NONE;
        f->type_count = 0;
    }
    return rc;
}

/* The last use of a table gives back the references of its entries. */
static void drop_table(struct hv_domain *d, uint64_t mfn)
{
    struct hv_frame *f = &d->mm.frames[mfn];
    if (--f->type_count)
        return;
    const uint64_t *t = table_of(d, mfn);
    for (int i = 0; i < ENTRIES; i++)
        if (!xen_slot(d, f->type, i))
            drop_entry(d, f->type, t[i]);
    f->type = HV_FT_NONE;
}

/* ---- mmu_update ---- */

static __thread struct hv_mm_changed *noted_changes;

void hv_mm_note_changes(struct hv_mm_changed *c)
{
    noted_changes = c;
}

/* A present entry of a table in use at gpa no longer holds what it held: whoever
 * caches translations (a shadowing KVM) must learn of it before the next flush. */
static void live_entry_changed(struct hv_mm *mm, uint64_t gpa)
{
    struct hv_mm_changed *c = noted_changes;
    if (c && c->n < HV_MM_CHANGED_MAX)
        c->gpa[c->n++] = gpa;
    else
        __atomic_store_n(&mm->live_entry_changed, 1, __ATOMIC_RELEASE);
}

static int update_entry(struct hv_domain *d, uint64_t ptr, uint64_t val)
{
    struct hv_mm *mm = &d->mm;
    int cmd = (int)(ptr & 3);
    uint64_t mfn, old, *slot;
    struct hv_frame *f;
    int rc;

    ptr &= ~3ULL;
    mfn = ptr >> HV_PAGE_SHIFT;
    if ((ptr & 7) || mfn >= mm->nr_pages || !may_hold_table(d, mfn) ||
        !(mm->frames[mfn].flags & HV_FRAME_POPULATED) ||
        (mm->frames[mfn].flags & HV_FRAME_SEG_DESC))
        return -XEN_EINVAL;
    f = &mm->frames[mfn];
    slot = (uint64_t *)(d->ram + ptr);
    old = __atomic_load_n(slot, __ATOMIC_RELAXED);
    if (cmd == MMU_PT_UPDATE_PRESERVE_AD)
        val |= old & (PTE_A | PTE_D);
    /* In a frame that is (or, in the pool, will be) a table the CPU must never need
     * to set accessed or dirty; in any other frame this is a plain store, as Xen's. */
    if ((val & PTE_P) && (f->type_count || hv_mm_in_pool(mm, mfn)))
        val |= PTE_A | PTE_D;
    /* A pool frame not in use as a table is checked when it comes into use. */
    if (f->type_count) {
        if (xen_slot(d, f->type, (int)((ptr & (HV_PAGE_SIZE - 1)) / 8)))
            return -XEN_EINVAL;         /* Xen's "L4 update in Xen-private area" */
        val = adjust_entry(d, f->type, val);
        rc = take_entry(d, f->type, val);
        if (rc)
            return rc;
    }
    __atomic_store_n(slot, val, __ATOMIC_RELEASE);
    if (f->type_count && (old & PTE_P) && old != val)
        live_entry_changed(mm, ptr);
    if (f->type_count)
        drop_entry(d, f->type, old);
    return 0;
}

/* A native guest's trapped store to a page-table entry (dev_ptw.c): validated and
 * applied exactly as one MMU_NORMAL_PT_UPDATE request. */
int hv_mm_write_pte(struct hv_domain *d, uint64_t gpa, uint64_t val)
{
    if (!d->mm.frames || (gpa & 7))
        return -XEN_EINVAL;
    return update_entry(d, gpa | MMU_NORMAL_PT_UPDATE, val);
}

static int mmu_update_one(struct hv_vcpu *v, const void *item)
{
    const struct mmu_update *req = item;
    struct hv_domain *d = v->dom;
    uint64_t mfn;

    switch (req->ptr & 3) {
    case MMU_NORMAL_PT_UPDATE:
    case MMU_PT_UPDATE_PRESERVE_AD:
    case MMU_PT_UPDATE_NO_TRANSLATE:    /* pfn == mfn: the same as a normal update */
        return update_entry(d, req->ptr, req->val);
    case MMU_MACHPHYS_UPDATE:
        /* The m2p of an auto-translated domain is the identity: only that is accepted. */
        mfn = req->ptr >> HV_PAGE_SHIFT;
        if (mfn >= d->mm.nr_pages || !(d->mm.frames[mfn].flags & HV_FRAME_POPULATED) ||
            req->val != mfn)
            return -XEN_EINVAL;
        return 0;
    }
    return -XEN_ENOSYS;
}

/* ---- mmuext_op ---- */

static int pin_table(struct hv_domain *d, uint64_t mfn, int type)
{
    struct hv_mm *mm = &d->mm;
    int rc;

    if (mfn >= mm->nr_pages || !(mm->frames[mfn].flags & HV_FRAME_POPULATED))
        return -XEN_EINVAL;
    rc = take_table(d, mfn, type);
    if (rc)
        return rc;
    if (mm->frames[mfn].flags & HV_FRAME_PINNED) {     /* pins do not nest */
        drop_table(d, mfn);
        return -XEN_EINVAL;
    }
    mm->frames[mfn].flags |= HV_FRAME_PINNED;
    return 0;
}

/* Unpinned, a table keeps its type for as long as something else still uses it. */
static int unpin_table(struct hv_domain *d, uint64_t mfn)
{
    struct hv_mm *mm = &d->mm;

    if (mfn >= mm->nr_pages || !(mm->frames[mfn].flags & HV_FRAME_POPULATED) ||
        !(mm->frames[mfn].flags & HV_FRAME_PINNED))
        return -XEN_EINVAL;
    mm->frames[mfn].flags &= ~HV_FRAME_PINNED;
    drop_table(d, mfn);
    return 0;
}

static int new_baseptr(struct hv_vcpu *v, uint64_t mfn)
{
    struct hv_domain *d = v->dom;
    uint64_t old = v->base_mfn;
    int rc;

    if (mfn == old)                     /* Xen's write_ptbase: the same tables, a flush */
        return v->ops->flush_tlb(v) < 0 ? -XEN_EIO : 0;
    rc = take_table(d, mfn, HV_FT_L4);
    if (rc)
        return rc;
    if (v->ops->set_cr3(v, mfn << HV_PAGE_SHIFT) < 0) {
        drop_table(d, mfn);
        return -XEN_EIO;
    }
    v->base_mfn = mfn;
    if (old != HV_NO_FRAME)
        drop_table(d, old);
    return 0;
}

int hv_mm_new_baseptr(struct hv_vcpu *v, uint64_t mfn)
{
    return new_baseptr(v, mfn);
}

int hv_mm_get_table(struct hv_domain *d, uint64_t mfn, int type)
{
    return take_table(d, mfn, type);
}

void hv_mm_put_table(struct hv_domain *d, uint64_t mfn)
{
    drop_table(d, mfn);
}

/* The L4 Xen switches to for guest user mode (pv_traps.c); frame 0 clears it. */
static int new_user_baseptr(struct hv_vcpu *v, uint64_t mfn)
{
    struct hv_domain *d = v->dom;
    uint64_t old = v->pv.user_l4;
    int rc;

    if (mfn) {
        rc = take_table(d, mfn, HV_FT_L4);
        if (rc)
            return rc;
    }
    v->pv.user_l4 = mfn;
    if (old)
        drop_table(d, old);
    return 0;
}

/* Frames the guest may write: populated RAM outside the pool. */
static int writable_frame(struct hv_domain *d, uint64_t mfn)
{
    return hv_mm_frame_usable(d, mfn);
}

static int mmuext_one(struct hv_vcpu *v, const void *item)
{
    const struct mmuext_op *op = item;
    struct hv_domain *d = v->dom;
    uint64_t mask;

    switch (op->cmd) {
    case MMUEXT_PIN_L1_TABLE:
    case MMUEXT_PIN_L2_TABLE:
    case MMUEXT_PIN_L3_TABLE:
    case MMUEXT_PIN_L4_TABLE:
        return pin_table(d, op->arg1, (int)(op->cmd - MMUEXT_PIN_L1_TABLE) + HV_FT_L1);
    case MMUEXT_UNPIN_TABLE:
        return unpin_table(d, op->arg1);
    case MMUEXT_NEW_BASEPTR:
        return new_baseptr(v, op->arg1);
    case MMUEXT_SET_LDT:
        if (d->pv_model != HV_PV_XEN)
            break;                      /* a ring-0 kernel loads its own LDTR */
        return pv_set_ldt(v, op->arg1, op->arg2);
    case MMUEXT_NEW_USER_BASEPTR:
        if (d->pv_model != HV_PV_XEN)
            break;                      /* a ring-0 kernel has no user mode of Xen's */
        return new_user_baseptr(v, op->arg1);
    case MMUEXT_TLB_FLUSH_MULTI:
    case MMUEXT_INVLPG_MULTI:
        /* arg2 points at a vCPU bitmap; Xen reads one word per 64 vCPUs. */
        if (hv_copy_from_guest(v, &mask, op->arg2, sizeof(mask)) < 0)
            return -XEN_EINVAL;
        /* fall through: every other vCPU is flushed, a superset of the mask */
    case MMUEXT_TLB_FLUSH_ALL:
    case MMUEXT_INVLPG_ALL:
        hv_vcpu_flush_others(v);
        /* fall through */
    case MMUEXT_TLB_FLUSH_LOCAL:
    case MMUEXT_INVLPG_LOCAL:
        return v->ops->flush_tlb(v) < 0 ? -XEN_EIO : 0;
    case MMUEXT_FLUSH_CACHE:
        return -XEN_EACCES;         /* a domain without devices may not (Xen) */
    case MMUEXT_CLEAR_PAGE:
        if (!writable_frame(d, op->arg1))
            return -XEN_EINVAL;
        memset(d->ram + (op->arg1 << HV_PAGE_SHIFT), 0, HV_PAGE_SIZE);
        return 0;
    case MMUEXT_COPY_PAGE:
        if (op->arg2 >= d->mm.nr_pages ||
            !(d->mm.frames[op->arg2].flags & HV_FRAME_POPULATED) || !writable_frame(d, op->arg1))
            return -XEN_EINVAL;
        memmove(d->ram + (op->arg1 << HV_PAGE_SHIFT), d->ram + (op->arg2 << HV_PAGE_SHIFT),
                HV_PAGE_SIZE);
        return 0;
    case MMUEXT_MARK_SUPER:
    case MMUEXT_UNMARK_SUPER:
        return -XEN_EOPNOTSUPP;     /* as Xen since superpage support was removed */
    }
    return -XEN_ENOSYS;
}

/* ---- the batch shape mmu_update and mmuext_op share ---- */

/* foreigndom: low 16 bits the page owner, high 16 bits the page-table owner + 1. Only
 * the domain itself qualifies; like Xen, naming its own id as a foreign domain is -ESRCH. */
static int owner_is_self(struct hv_domain *d, uint32_t foreigndom)
{
    uint32_t pt_dom = foreigndom >> 16;
    return (foreigndom & 0xffff) == DOMID_SELF && (pt_dom == 0 || pt_dom - 1 == d->domid);
}

static int64_t run_batch(struct hv_vcpu *v, const struct hv_hcall *h, uint64_t item_size,
                         int (*one)(struct hv_vcpu *v, const void *item))
{
    struct hv_domain *d = v->dom;
    uint64_t items = h->a1, pdone = h->a3;
    uint32_t count = (uint32_t)h->a2, i;
    uint8_t item[32];
    int rc = 0;

    if (!d->mm.frames)
        return -XEN_ENOSYS;
    if (!hv_mm_range_ok(items, (uint64_t)count * item_size))
        return -XEN_EFAULT;
    if (!owner_is_self(d, (uint32_t)h->a4))
        return -XEN_ESRCH;
    for (i = 0; i < count; i++) {
        if (hv_copy_from_guest(v, item, items + (uint64_t)i * item_size, item_size) < 0) {
            rc = -XEN_EFAULT;
            break;
        }
        rc = one(v, item);
        if (rc)
            break;
    }
    /* Like Xen, the count is written whatever happened, and a bad pointer is ignored. */
    if (pdone)
        hv_copy_to_guest(v, pdone, &i, sizeof(i));
    return rc;
}

int64_t do_mmu_update(struct hv_vcpu *v, const struct hv_hcall *h)
{
    return run_batch(v, h, sizeof(struct mmu_update), mmu_update_one);
}

int64_t do_mmuext_op(struct hv_vcpu *v, const struct hv_hcall *h)
{
    return run_batch(v, h, sizeof(struct mmuext_op), mmuext_one);
}

/* ---- update_va_mapping ---- */

/* update_va_mapping(va, val, flags): the L1 entry that maps va through the current
 * page tables := val, validated as an MMU_NORMAL_PT_UPDATE; then the flush flags ask
 * for. va must reach an L1 table (no superpage, not Xen's slots); a refused entry is
 * -EINVAL, except a frame outside the domain's RAM (Xen: I/O), -EPERM. */
/* The machine address of the L1 entry that maps va through the current page tables:
 * va must reach a validated L1 table (no superpage, not Xen's slots). */
int hv_mm_l1e_of_va(struct hv_vcpu *v, uint64_t va, uint64_t *pte)
{
    struct hv_domain *d = v->dom;
    uint64_t table;

    if (!d->mm.frames || !hv_mm_range_ok(va, 1) || v->ops->get_cr3(v, &table) < 0)
        return -XEN_EINVAL;
    table &= PTE_ADDR;
    for (int level = 4; level > 1; level--) {
        unsigned idx = (unsigned)(va >> (12 + 9 * (level - 1))) & 511;
        uint64_t e;
        if (xen_slot(d, level, (int)idx) || !hv_gpa_valid(d, table + idx * 8, 8))
            return -XEN_EINVAL;
        e = table_of(d, table >> HV_PAGE_SHIFT)[idx];
        if (!(e & PTE_P) || (e & (1ULL << 7)))     /* absent, or a superpage (PS) */
            return -XEN_EINVAL;
        table = e & PTE_ADDR;
    }
    *pte = table + ((va >> 12) & 511) * 8;
    return hv_mm_is_l1e(d, *pte) ? 0 : -XEN_EINVAL;
}

/* 1 if pte is the (aligned) address of an entry of a validated L1 table. */
int hv_mm_is_l1e(struct hv_domain *d, uint64_t pte)
{
    uint64_t mfn = pte >> HV_PAGE_SHIFT;
    return d->mm.frames && !(pte & 7) && mfn < d->mm.nr_pages &&
           d->mm.frames[mfn].type == HV_FT_L1 && d->mm.frames[mfn].type_count;
}

/* Write the L1 entry at pte as mmu_update would: validated, references moved. */
int hv_mm_set_l1e(struct hv_domain *d, uint64_t pte, uint64_t val)
{
    if (!hv_mm_is_l1e(d, pte))
        return -XEN_EINVAL;
    return update_entry(d, pte | MMU_NORMAL_PT_UPDATE, val);
}

/* GNTTABOP_unmap_and_replace: the entry at `from` moves to `to` (its reference goes
 * with it) and `from` becomes empty; what `to` mapped before is released. */
int hv_mm_move_l1e(struct hv_domain *d, uint64_t from, uint64_t to)
{
    uint64_t *src, *dst, old, e;
    if (!hv_mm_is_l1e(d, from) || !hv_mm_is_l1e(d, to))
        return -XEN_EINVAL;
    src = (uint64_t *)(d->ram + from);
    dst = (uint64_t *)(d->ram + to);
    e = __atomic_exchange_n(src, 0, __ATOMIC_ACQ_REL);
    old = __atomic_exchange_n(dst, e, __ATOMIC_ACQ_REL);
    if (e & PTE_P)
        live_entry_changed(&d->mm, from);
    if ((old & PTE_P) && old != e)
        live_entry_changed(&d->mm, to);
    drop_entry(d, 1, old);
    return 0;
}

int64_t do_update_va_mapping(struct hv_vcpu *v, const struct hv_hcall *h)
{
    struct hv_domain *d = v->dom;
    uint64_t va = h->a1, val = h->a2, flags = h->a3, pte, mask;
    int rc;

    if (!d->mm.frames)
        return -XEN_ENOSYS;
    if (hv_mm_l1e_of_va(v, va, &pte) < 0)
        return -XEN_EINVAL;
    rc = update_entry(d, pte, val);
    if (rc)
        return rc == -XEN_EPERM ? rc : -XEN_EINVAL;
    if ((flags & UVMF_FLUSHTYPE_MASK) != UVMF_TLB_FLUSH && (flags & UVMF_FLUSHTYPE_MASK) != UVMF_INVLPG)
        return 0;
    /* anything above the flush type but UVMF_ALL is a pointer to a vCPU bitmap */
    if ((flags & ~(uint64_t)UVMF_FLUSHTYPE_MASK) > UVMF_ALL &&
        hv_copy_from_guest(v, &mask, flags & ~(uint64_t)UVMF_FLUSHTYPE_MASK, sizeof(mask)) < 0)
        return -XEN_EFAULT;
    if (flags & ~(uint64_t)UVMF_FLUSHTYPE_MASK)     /* UVMF_ALL or a mask: the others too */
        hv_vcpu_flush_others(v);
    return v->ops->flush_tlb(v) < 0 ? -XEN_EIO : 0;
}

/* ---- set-up, tear-down, audit ---- */

void hv_mm_destroy(struct hv_domain *d)
{
    free(d->mm.frames);
    memset(&d->mm, 0, sizeof(d->mm));
}

/* Start the domain below its maximum: frames from `populated` up are not populated
 * (xl's memory < maxmem); the guest balloons up into them with populate_physmap. */
int hv_mm_set_reservation(struct hv_domain *d, uint64_t populated, char *err, int err_len)
{
    struct hv_mm *mm = &d->mm;

    if (!mm->frames || populated > mm->nr_pages) {
        hv_set_error(err, err_len, "%llu pages is above the domain's %llu",
                     (unsigned long long)populated, (unsigned long long)mm->nr_pages);
        return -1;
    }
    for (uint64_t i = populated; i < mm->nr_pages; i++) {
        struct hv_frame *f = &mm->frames[i];
        if (f->type_count || f->map_count || hv_mm_in_pool(mm, i)) {
            hv_set_error(err, err_len, "frame %#llx is in use: cannot start with %llu pages",
                         (unsigned long long)i, (unsigned long long)populated);
            return -1;
        }
    }
    for (uint64_t i = populated; i < mm->nr_pages; i++) {
        if (mm->frames[i].flags & HV_FRAME_POPULATED) {
            mm->frames[i].flags &= (uint8_t)~HV_FRAME_POPULATED;
            mm->nr_populated--;
        }
    }
    return 0;
}

int hv_mm_init(struct hv_domain *d, uint64_t cr3, char *err, int err_len)
{
    struct hv_mm *mm = &d->mm;
    struct hv_vcpu *boot_vcpu = d->vcpus[0];
    uint64_t root = cr3 >> HV_PAGE_SHIFT;
    int rc;

    if (!boot_vcpu) {
        hv_set_error(err, err_len, "the domain has no vCPU 0 to take the bootstrap L4");
        return -1;
    }
    hv_mm_destroy(d);
    mm->nr_pages = d->ram_bytes >> HV_PAGE_SHIFT;
    mm->frames = calloc(mm->nr_pages, sizeof(*mm->frames));
    if (!mm->frames) {
        hv_set_error(err, err_len, "out of host memory for %llu frame records",
                     (unsigned long long)mm->nr_pages);
        return -1;
    }
    for (uint64_t i = 0; i < mm->nr_pages; i++)
        mm->frames[i].flags = HV_FRAME_POPULATED;
    mm->nr_populated = mm->nr_pages;
    mm->pool_first = d->pt_pool_start >> HV_PAGE_SHIFT;
    mm->pool_end = d->pt_pool_end >> HV_PAGE_SHIFT;
    boot_vcpu->base_mfn = HV_NO_FRAME;
    if (d->guest_type == HV_GUEST_PVH)
        return 0;       /* its page tables are its own, in ordinary RAM: nothing to type */

    if ((cr3 & (HV_PAGE_SIZE - 1)) || root >= mm->nr_pages || !may_hold_table(d, root)) {
        hv_set_error(err, err_len, "cr3 %#llx is not a frame that may hold the bootstrap page "
                     "tables (pool [%#llx, %#llx))", (unsigned long long)cr3,
                     (unsigned long long)d->pt_pool_start, (unsigned long long)d->pt_pool_end);
        hv_mm_destroy(d);
        return -1;
    }
    /* The bootstrap L4 is in use as cr3 and pinned, as Xen pins the initial top level. */
    rc = take_table(d, root, HV_FT_L4);
    if (rc) {
        hv_set_error(err, err_len, "the bootstrap page tables from cr3 %#llx are invalid "
                     "(Xen errno %d)", (unsigned long long)cr3, -rc);
        hv_mm_destroy(d);
        return -1;
    }
    boot_vcpu->base_mfn = root;
    mm->frames[root].type_count++;
    mm->frames[root].flags |= HV_FRAME_PINNED;
    return 0;
}

/* Recount every reference from the tables themselves and compare with the records. */
int hv_mm_audit(struct hv_domain *d, char *err, int err_len)
{
    struct hv_mm *mm = &d->mm;
    uint64_t n = mm->nr_pages, populated = 0;
    uint32_t *type_refs, *maps, *wmaps;
    int rc = -1;

    if (!mm->frames) {
        hv_set_error(err, err_len, "memory service not initialised");
        return -1;
    }
    type_refs = calloc(n, sizeof(uint32_t));
    maps = calloc(n, sizeof(uint32_t));
    wmaps = calloc(n, sizeof(uint32_t));
    if (!type_refs || !maps || !wmaps) {
        hv_set_error(err, err_len, "out of host memory");
        goto out;
    }
    for (int i = 0; i < HV_MAX_VCPUS; i++) {      /* each vCPU's L4s hold a reference */
        const struct hv_vcpu *v = d->vcpus[i];
        if (v && v->base_mfn != HV_NO_FRAME && v->base_mfn < n)
            type_refs[v->base_mfn]++;
        if (v && v->pv.user_l4 && v->pv.user_l4 < n)
            type_refs[v->pv.user_l4]++;
    }
    for (uint64_t m = 0; m < n; m++) {
        const struct hv_frame *f = &mm->frames[m];
        if (f->flags & HV_FRAME_POPULATED)
            populated++;
        if (f->flags & HV_FRAME_PINNED)
            type_refs[m]++;
        if (!f->type_count)
            continue;
        const uint64_t *t = table_of(d, m);
        for (int i = 0; i < ENTRIES; i++) {
            uint64_t e = t[i], c = (e & PTE_ADDR) >> HV_PAGE_SHIFT;
            if (!(e & PTE_P) || xen_slot(d, f->type, i))
                continue;
            if (!(e & PTE_A) || (f->type == HV_FT_L1 && !(e & PTE_D)) ||
                (e & ~(f->type == HV_FT_L1 ? L1_ALLOWED : UPPER_ALLOWED)) || c >= n) {
                hv_set_error(err, err_len, "frame %#llx entry %d: %#llx is not allowed",
                             (unsigned long long)m, i, (unsigned long long)e);
                goto out;
            }
            if (f->type == HV_FT_L1) {
                maps[c]++;
                if (e & PTE_RW)
                    wmaps[c]++;
            } else {
                if (mm->frames[c].type != f->type - 1) {
                    hv_set_error(err, err_len, "frame %#llx (L%d) entry %d names frame %#llx "
                                 "of type %d", (unsigned long long)m, f->type, i,
                                 (unsigned long long)c, mm->frames[c].type);
                    goto out;
                }
                type_refs[c]++;
            }
        }
    }
    for (uint64_t m = 0; m < n; m++) {
        const struct hv_frame *f = &mm->frames[m];
        const char *bad = NULL;
        if (f->type_count != type_refs[m])
            bad = "type count";
        else if (f->map_count != maps[m] || f->wmap_count != wmaps[m])
            bad = "mapping count";
        else if ((f->type_count == 0) != (f->type == HV_FT_NONE))
            bad = "type without references";
        else if (f->type != HV_FT_NONE && !may_hold_table(d, m))
            bad = "page table outside the pool";
        else if (f->wmap_count && f->type != HV_FT_NONE)
            bad = "page table mapped writable";
        else if (f->wmap_count && hv_mm_in_pool(mm, m))
            bad = "pool frame mapped writable";
        else if (f->wmap_count && (f->flags & HV_FRAME_SEG_DESC))
            bad = "GDT frame mapped writable";
        else if ((f->map_count || f->type_count) && !(f->flags & HV_FRAME_POPULATED))
            bad = "unpopulated frame in use";
        if (bad) {
            hv_set_error(err, err_len, "frame %#llx: %s (type %d count %u/%u, maps %u/%u, "
                         "writable %u/%u)", (unsigned long long)m, bad, f->type, f->type_count,
                         type_refs[m], f->map_count, maps[m], f->wmap_count, wmaps[m]);
            goto out;
        }
    }
    if (populated != mm->nr_populated) {
        hv_set_error(err, err_len, "%llu frames populated, %llu counted",
                     (unsigned long long)populated, (unsigned long long)mm->nr_populated);
        goto out;
    }
    if (d->shared_info_gpa != HV_NO_PAGE &&
        !hv_mm_frame_usable(d, d->shared_info_gpa >> HV_PAGE_SHIFT)) {
        hv_set_error(err, err_len, "shared_info at %#llx is not a usable frame",
                     (unsigned long long)d->shared_info_gpa);
        goto out;
    }
    rc = 0;
out:
    free(type_refs);
    free(maps);
    free(wmaps);
    return rc;
}
