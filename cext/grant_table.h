/*
 * grant_table.h - grant tables (grant_table.c): how one domain lets another use its pages.
 *
 * Every domain has a grant table: frames of the hypervisor's, in the domain's memory
 * file just after its RAM (guest-physical frame nr_pages + i), that the guest writes
 * entries into (v1: struct grant_entry_v1, 512 a frame). A PV guest maps them by frame
 * number (setup_table), a PVH guest places them with XENMEM_add_to_physmap. After the
 * table's frames come its status frames (v2) and the PV foreign-mapping window.
 *
 * Backends inside trapless (blkif, ...) use a granted page like this:
 *
 *     struct hv_grant_use use;
 *     int16_t st = hv_grant_acquire(frontend_domid, gref, backend_domid,
 *                                   HV_GRANT_WRITE, &use);   // or HV_GRANT_READ
 *     if (st != GNTST_okay) -> answer the request with an error (st is Xen's GNTST_*)
 *     memcpy(use.page, ..., 4096)   // use.page: host pointer to the whole granted page
 *     hv_grant_release(&use);       // once the request is done; use.page is gone after
 *
 * (hv_grant_copy does one copy in or out of the page without a mapping.)
 * acquire checks the entry as Xen's map does (permit_access, the entry names the
 * backend's domid, not readonly when writing) and sets GTF_reading (and GTF_writing)
 * in it, so the frontend cannot revoke the grant while the backend uses it; release
 * clears them when the last user is gone. use.page is a private host mapping of the
 * page: it stays valid until release even if the frontend is destroyed meanwhile.
 * Callable from any thread.
 */
#ifndef TRAPLESS_GRANT_TABLE_H
#define TRAPLESS_GRANT_TABLE_H
#include <stdint.h>


struct hv_domain;
struct hv_grant_table;

/* cdef-begin */
/* The grant region, in frames after the domain's RAM: the table's shared frames, the v2
 * status frames, then (PV) the window through which the domain maps other domains'
 * granted pages (a PV domain's frame numbers are its own, so a foreign page gets one of
 * these). Literal numbers, so Python reads them too; grant_table.c checks the sums. */
#define HV_GNT_MAX_FRAMES       64      /* Xen's default gnttab_max_frames */
#define HV_GNT_STATUS_FRAMES    8       /* v2 status words for 64 frames x 256 entries */
#define HV_GNT_WINDOW_BASE      72
#define HV_GNT_WINDOW_FRAMES    256
#define HV_GNT_REGION_FRAMES    328
#define HV_GNT_MAX_MAPTRACK     4096    /* grant mappings one domain may hold at once */
/* How far up a PVH guest may place table frames (XENMEM_add_to_physmap) beyond its RAM:
 * 64 GiB, above the first free 128 MiB-aligned stretch Linux's unpopulated-alloc takes
 * (4 GiB for a domain below 4 GiB). */
#define HV_PVH_PLACE_LIMIT      0x1000000000

#define HV_GRANT_READ   0
#define HV_GRANT_WRITE  1

struct hv_grant_use {
    uint8_t *page;                  /* the granted page, 4096 bytes */
    uint16_t granter;               /* the rest: what release needs */
    uint32_t ref;
    int      write;
};

int16_t hv_grant_acquire(uint16_t granter, uint32_t ref, uint16_t user, int write,
                         struct hv_grant_use *use);
void    hv_grant_release(struct hv_grant_use *use);
/* The short way for one copy, with no mapping to make (acquire + release map and unmap
 * the page: 11.2 us against 0.72 us for a 4 KiB copy, one measurement on the
 * development host, from Python): the same checks, then len bytes at offset of the
 * granted page are copied to buf (HV_GRANT_READ) or from buf (HV_GRANT_WRITE) under the
 * grant lock. Never with a lock of the backend's held, nor around blocking I/O. */
int16_t hv_grant_copy(uint16_t granter, uint32_t ref, uint16_t user, int write,
                      uint32_t offset, void *buf, uint32_t len);
/* cdef-end */

/* For a backend that belongs to the granting domain itself and is gone before the
 * domain's RAM is (blkback: detached in hv_domain_destroy before unmap_ram): n grants
 * of d checked and pinned as acquire does, under one lock, and pages[i] pointed at the
 * granted frame in d's own RAM mapping, so no mapping is made or torn down per page.
 * All or nothing: on an error (the first one's GNTST_*) nothing stays pinned. Unpin
 * with the same refs and write. */
int16_t hv_grant_pin_own(struct hv_domain *d, const uint32_t *refs, unsigned n, uint16_t user,
                         int write, uint8_t **pages);
void    hv_grant_unpin_own(struct hv_domain *d, const uint32_t *refs, unsigned n, int write);

/* The domain's side (domain.c, memory.c, mm.c). */
int  hv_gnt_init(struct hv_domain *d, char *err, int err_len);
void hv_gnt_destroy(struct hv_domain *d);
/* A guest page-table entry starts or stops mapping frame `mfn` of the grant region. */
int  hv_gnt_frame_take(struct hv_domain *d, uint64_t mfn);
void hv_gnt_frame_drop(struct hv_domain *d, uint64_t mfn);
int  hv_gnt_in_region(const struct hv_domain *d, uint64_t mfn);
/* 1 if another domain or a backend uses frame gpfn through a grant (the balloon keeps it). */
int  hv_gnt_frame_granted(struct hv_domain *d, uint64_t gpfn);
/* XENMEM_add_to_physmap, XENMAPSPACE_grant_table: put table frame idx at gpfn. */
int64_t hv_gnt_add_to_physmap(struct hv_domain *d, uint64_t idx, uint64_t gpfn);
/* A PVH guest's load or store at gpa in the hole above its RAM: 1 if a table frame it
 * placed there took it (the engines' MMIO path asks before reading all ones). */
int  hv_gnt_hole_access(struct hv_domain *d, uint64_t gpa, int size, int is_write, uint8_t *data);

#endif
