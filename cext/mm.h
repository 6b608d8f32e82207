/*
 * mm.h - the memory service's per-domain state: one record per guest frame (memory.c, mm.c).
 *
 * trapless domains are auto-translated with pfn == mfn, so a frame number is both. Every
 * frame below nr_pages belongs to the domain; it is populated (backed by host memory the
 * guest may use) or released by the balloon. Page tables live only in the pool
 * [pool_first, pool_end), which the guest can read but never write.
 *
 * A frame's page-table type (L1..L4) is held by references, as in Xen: a pin, a present
 * entry of a validated table one level up, and use as the vCPU's base table each hold one.
 * The first reference validates the table and takes references for all its present
 * entries; the last one releases them. A pool frame without references is an unused
 * table: writes to it are not checked until it is first used.
 */
#ifndef TRAPLESS_MM_H
#define TRAPLESS_MM_H
#include <stdint.h>

enum hv_frame_type {
    HV_FT_NONE = 0,                 /* plain RAM, or a pool frame not in use as a table */
    HV_FT_L1 = 1,
    HV_FT_L2 = 2,
    HV_FT_L3 = 3,
    HV_FT_L4 = 4,
};

#define HV_FRAME_POPULATED  0x01
#define HV_FRAME_PINNED     0x02
#define HV_FRAME_SEG_DESC   0x04        /* part of the vCPU's GDT (set_gdt): never writable */
#define HV_FRAME_WAS_WRITABLE 0x08      /* its last writable mapping went away since the last
                                         * TLB flush: a stale translation may still write it */

struct hv_frame {
    uint8_t  flags;                 /* HV_FRAME_* */
    uint8_t  type;                  /* enum hv_frame_type; HV_FT_NONE while type_count is 0 */
    uint16_t _pad;
    uint32_t type_count;            /* references holding the type (see above) */
    uint32_t map_count;             /* present entries of validated L1 tables mapping it */
    uint32_t wmap_count;            /* ... of which writable */
};

#define HV_NO_FRAME (~0ULL)

struct hv_mm {
    uint64_t nr_pages;              /* frames of guest-physical memory: the maximum reservation */
    uint64_t nr_populated;          /* the current reservation */
    uint64_t pool_first, pool_end;  /* frame numbers of the page-table pool */
    uint64_t alloc_hint;            /* where increase_reservation starts looking */
    struct hv_frame *frames;        /* nr_pages records; NULL until hv_mm_init */
    int live_entry_changed;         /* a present entry of a table in use changed since the
                                     * last flush (kvm.c: a shadowing KVM must be told) */
};

struct hv_domain;

/* The entries of tables in use whose present value changed while one PV exit was
 * handled, by guest-physical address (kvm.c shows each write to a KVM that shadows
 * the guest's tables). */
#define HV_MM_CHANGED_MAX 240
struct hv_mm_changed {
    unsigned n;
    uint64_t gpa[HV_MM_CHANGED_MAX];
};
/* From now on this thread notes such entries in *c (NULL: it stops). Changes noted
 * nowhere, or past a full list, set live_entry_changed instead. */
void hv_mm_note_changes(struct hv_mm_changed *c);

/* Shared between memory.c (memory_op) and mm.c (page tables). */
int  hv_mm_in_pool(const struct hv_mm *mm, uint64_t mfn);
/* 1 if the whole guest-virtual range lies in one canonical half (Xen's guest_handle_okay). */
int  hv_mm_range_ok(uint64_t gva, uint64_t len);
/* 1 if gpfn is populated RAM outside the pool: a frame the hypervisor may write for the
 * guest (shared_info, vcpu_info, rings). */
int  hv_mm_frame_usable(struct hv_domain *d, uint64_t gpfn);
void hv_mm_destroy(struct hv_domain *d);
struct hv_vcpu;
/* MMUEXT_NEW_BASEPTR: mfn becomes the kernel L4 (validated; a type reference). */
int  hv_mm_new_baseptr(struct hv_vcpu *v, uint64_t mfn);
/* One more use of frame mfn as a page table of type (enum hv_frame_type), the first
 * validating it (Xen's get_page_and_type): 0 or -errno. hv_mm_put_table gives it back. */
int  hv_mm_get_table(struct hv_domain *d, uint64_t mfn, int type);
void hv_mm_put_table(struct hv_domain *d, uint64_t mfn);
/* Before a frame becomes a page table or descriptor table: make sure no stale TLB
 * entry can still write it (flushes if it was writable since the last flush). 0 or -1. */
int  hv_mm_seal_frame(struct hv_domain *d, uint64_t mfn);

/* PV grant mappings (grant_table.c): L1 entries found by address and written as
 * mmu_update writes them. */
struct hv_vcpu;
int  hv_mm_l1e_of_va(struct hv_vcpu *v, uint64_t va, uint64_t *pte);
int  hv_mm_is_l1e(struct hv_domain *d, uint64_t pte);
int  hv_mm_set_l1e(struct hv_domain *d, uint64_t pte, uint64_t val);
int  hv_mm_move_l1e(struct hv_domain *d, uint64_t from, uint64_t to);

#endif
