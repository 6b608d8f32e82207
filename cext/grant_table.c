/*
 * grant_table.c - grant_table_op: one domain's pages used by another (Xen's grant tables).
 *
 * A domain's table lives in its grant region (grant_table.h): shared frames the guest
 * writes entries into and, in v2, status frames where the hypervisor keeps
 * GTF_reading/GTF_writing. Per entry the hypervisor keeps an active record (who pinned
 * it, how often, which frame); per mapping domain a maptrack (the handles map_grant_ref
 * gives out). One lock covers every domain's grant state: a map meets two domains.
 *
 * Mappings: a PV guest's host mapping is an L1 entry written through the PV MMU (mm.c).
 * trapless PV frame numbers are per domain, so another domain's page first gets a frame
 * of the mapper's window (grant_table.h): the granter's page of its memory file is
 * mapped over that frame (MAP_FIXED; KVM sees it through its MMU notifiers, Unicorn
 * through the host pointer) and the PTE names the window frame; dev_bus_addr is its
 * address. A PVH guest's host mapping replaces the page at a guest frame the same way.
 * Unmapping maps the domain's own page back. The mapper's mapping of the file keeps the
 * page alive if the granter goes away first.
 * Results follow Xen's common/grant_table.c; where trapless differs it says so.
 */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "hv.h"

#define V1_PER_FRAME      (HV_PAGE_SIZE / sizeof(struct grant_entry_v1))
#define V2_PER_FRAME      (HV_PAGE_SIZE / sizeof(struct grant_entry_v2))
#define STATUS_PER_FRAME  (HV_PAGE_SIZE / sizeof(uint16_t))
#define MAX_ENTRIES       (HV_GNT_MAX_FRAMES * V1_PER_FRAME)
_Static_assert(HV_GNT_WINDOW_BASE == HV_GNT_MAX_FRAMES + HV_GNT_STATUS_FRAMES &&
               HV_GNT_REGION_FRAMES == HV_GNT_WINDOW_BASE + HV_GNT_WINDOW_FRAMES &&
               HV_GNT_STATUS_FRAMES * 2048 >= HV_GNT_MAX_FRAMES * 256, "grant region layout");
#define INVALID_GFN       (~0ULL)
#define PTE_P   (1ULL << 0)
#define PTE_RW  (1ULL << 1)
#define PTE_US  (1ULL << 2)
#define PTE_A   (1ULL << 5)
#define PTE_D   (1ULL << 6)
#define PTE_ADDR 0x000ffffffffff000ULL

enum { PIN_HOST, PIN_DEVICE };      /* a pin's kind: host (maps, copies, backends), device */
#define PIN_LIMIT 128               /* Xen: a pin count of a kind reaching bit 7 is full */

struct active {                     /* one entry in use */
    uint32_t readers, writers;      /* all pins */
    uint16_t pins[2][2];            /* [kind][write]: Xen's four 8-bit pin counters */
    uint16_t domid;                 /* the domain using it */
    uint64_t frame;
};

struct maptrack {                   /* one mapping a domain holds (its handle) */
    uint32_t flags;                 /* GNTMAP_host_map | device_map | readonly; 0: free */
    uint16_t dom;                   /* the granter */
    uint32_t ref;
    uint64_t host_addr;
    uint64_t frame;                 /* the granter's frame */
    uint64_t pte_frame;             /* the frame the mapper names it by (PV) */
    int32_t  window;                /* the window slot it uses, -1 for none */
};

struct hv_grant_table {
    uint32_t version;               /* 1 or 2 */
    uint32_t nr_frames;             /* shared frames the table has grown to */
    /* frames the guest has been told of (setup_table, get_status_frames): only those
     * have frame numbers it may map; the rest lie outside its memory as it knows it */
    uint32_t shared_shown, status_shown;
    struct active *active;          /* MAX_ENTRIES */
    struct maptrack *maptrack;      /* HV_GNT_MAX_MAPTRACK */
    uint32_t nr_pinned;             /* entries in use */
    uint32_t frame_maps[HV_GNT_REGION_FRAMES];  /* guest PTEs mapping each region frame */
    uint64_t placed[HV_GNT_REGION_FRAMES];      /* PVH: the gfn add_to_physmap put it at */
    uint8_t  window_used[HV_GNT_WINDOW_FRAMES];
};

/* Recursive: a grant op writes page-table entries (mm.c), and an entry it replaces may
 * have mapped a table frame, which comes back here (hv_gnt_frame_drop). */
static pthread_mutex_t gnt_lock = PTHREAD_RECURSIVE_MUTEX_INITIALIZER_NP;

/* ---- the table's memory ---- */

static uint64_t nr_ram_frames(const struct hv_domain *d)
{
    return d->ram_bytes >> HV_PAGE_SHIFT;
}

static uint8_t *region_frame(struct hv_domain *d, uint64_t i)
{
    return d->ram + d->ram_bytes + i * HV_PAGE_SIZE;
}

static uint32_t nr_entries(const struct hv_grant_table *gt)
{
    return gt->nr_frames * (uint32_t)(gt->version == 1 ? V1_PER_FRAME : V2_PER_FRAME);
}

static uint32_t nr_status_frames(const struct hv_grant_table *gt)
{
    return gt->version == 1 ? 0 : (nr_entries(gt) + STATUS_PER_FRAME - 1) / STATUS_PER_FRAME;
}

/* The header (flags, domid) of entry ref, and the word holding reading/writing. */
static uint32_t *entry_header(struct hv_domain *d, uint32_t ref)
{
    size_t size = d->gnt->version == 1 ? sizeof(struct grant_entry_v1) : sizeof(struct grant_entry_v2);
    return (uint32_t *)(d->ram + d->ram_bytes + (uint64_t)ref * size);
}

static uint16_t *status_word(struct hv_domain *d, uint32_t ref)
{
    if (d->gnt->version == 1)
        return (uint16_t *)entry_header(d, ref);
    return (uint16_t *)region_frame(d, HV_GNT_MAX_FRAMES) + ref;
}

static uint64_t entry_frame(struct hv_domain *d, uint32_t ref)
{
    if (d->gnt->version == 1)
        return ((struct grant_entry_v1 *)entry_header(d, ref))->frame;
    return ((struct grant_entry_v2 *)entry_header(d, ref))->frame;
}

int hv_gnt_in_region(const struct hv_domain *d, uint64_t mfn)
{
    return d->gnt && mfn >= nr_ram_frames(d) && mfn - nr_ram_frames(d) < HV_GNT_REGION_FRAMES;
}

/* A guest PTE may map the shared frames the guest was told of and, in v2, the status
 * frames it was told of. */
int hv_gnt_frame_take(struct hv_domain *d, uint64_t mfn)
{
    struct hv_grant_table *gt = d->gnt;
    uint64_t i = mfn - nr_ram_frames(d);
    int rc = 0;
    pthread_mutex_lock(&gnt_lock);
    if (i >= HV_GNT_WINDOW_BASE ? !gt->window_used[i - HV_GNT_WINDOW_BASE] :
        i < HV_GNT_MAX_FRAMES ? i >= gt->shared_shown
                              : i - HV_GNT_MAX_FRAMES >= gt->status_shown ||
                                i - HV_GNT_MAX_FRAMES >= nr_status_frames(gt))
        rc = -XEN_EPERM;            /* Xen: not a frame this domain may map */
    else
        gt->frame_maps[i]++;
    pthread_mutex_unlock(&gnt_lock);
    return rc;
}

void hv_gnt_frame_drop(struct hv_domain *d, uint64_t mfn)
{
    pthread_mutex_lock(&gnt_lock);
    d->gnt->frame_maps[mfn - nr_ram_frames(d)]--;
    pthread_mutex_unlock(&gnt_lock);
}

int hv_gnt_init(struct hv_domain *d, char *err, int err_len)
{
    struct hv_grant_table *gt = calloc(1, sizeof(*gt));
    if (gt)
        gt->active = calloc(MAX_ENTRIES, sizeof(*gt->active));
    if (gt)
        gt->maptrack = calloc(HV_GNT_MAX_MAPTRACK, sizeof(*gt->maptrack));
    if (!gt || !gt->active || !gt->maptrack) {
        if (gt) {
            free(gt->active);
            free(gt);
        }
        hv_set_error(err, err_len, "out of host memory");
        return -1;
    }
    gt->version = 1;
    gt->nr_frames = 1;              /* Xen's initial size */
    for (int i = 0; i < HV_GNT_REGION_FRAMES; i++)
        gt->placed[i] = INVALID_GFN;
    d->gnt = gt;
    return 0;
}

/* ---- pinning an entry: Xen's _set_status and its undo ---- */

/* Pin entry `ref` of rd for domain `user`: check it grants to user (and writing if
 * asked), set GTF_reading/GTF_writing, count the pin. Xen's checks and status codes. */
static int16_t pin(struct hv_domain *rd, uint32_t ref, uint16_t user, int write, int kind,
                   uint64_t *frame)
{
    struct hv_grant_table *gt = rd->gnt;
    struct active *act;
    uint64_t f;

    if (ref >= nr_entries(gt))
        return GNTST_bad_gntref;
    act = &gt->active[ref];
    if ((act->readers || act->writers) &&
        (act->domid != user || act->pins[kind][write] >= PIN_LIMIT))
        return GNTST_general_error;     /* another domain's, or the counter would overflow */
    if (!(act->readers || act->writers) || (write && !act->writers)) {
        uint32_t *hdr = entry_header(rd, ref), old = __atomic_load_n(hdr, __ATOMIC_ACQUIRE);
        uint16_t *status = status_word(rd, ref);
        for (int tries = 0;; tries++) {
            uint16_t flags = (uint16_t)old, domid = (uint16_t)(old >> 16);
            uint16_t set = GTF_reading | (write ? GTF_writing : 0);
            if (!(act->readers || act->writers) &&
                ((flags & (GTF_type_mask | GTF_sub_page)) != GTF_permit_access || domid != user))
                return GNTST_general_error;
            if (write && (flags & GTF_readonly))
                return GNTST_general_error;     /* a read-only grant mapped writable */
            if (rd->gnt->version == 2) {
                __atomic_or_fetch(status, set, __ATOMIC_ACQ_REL);
                break;
            }
            /* flags and domid change together or not at all: the guest may race us */
            if (__atomic_compare_exchange_n(hdr, &old, old | set, 0, __ATOMIC_ACQ_REL,
                                            __ATOMIC_ACQUIRE))
                break;
            if (tries == 4)
                return GNTST_general_error;     /* Xen: the entry is unstable */
        }
    }
    if (!(act->readers || act->writers)) {
        f = entry_frame(rd, ref);
        /* the granted frame: populated RAM of the granter, never its page tables */
        if (!hv_mm_frame_usable(rd, f)) {
            uint16_t *status = status_word(rd, ref);
            __atomic_and_fetch(status, (uint16_t)~(GTF_reading | GTF_writing), __ATOMIC_ACQ_REL);
            return GNTST_bad_page;
        }
        act->frame = f;
        act->domid = user;
        gt->nr_pinned++;
    }
    act->pins[kind][write]++;
    if (write)
        act->writers++;
    else
        act->readers++;
    *frame = act->frame;
    return GNTST_okay;
}

static void unpin(struct hv_domain *rd, uint32_t ref, int write, int kind)
{
    struct active *act = &rd->gnt->active[ref];
    uint16_t *status = status_word(rd, ref);
    act->pins[kind][write]--;
    if (write)
        act->writers--;
    else
        act->readers--;
    if (!act->writers)
        __atomic_and_fetch(status, (uint16_t)~GTF_writing, __ATOMIC_ACQ_REL);
    if (!act->writers && !act->readers) {
        __atomic_and_fetch(status, (uint16_t)~GTF_reading, __ATOMIC_ACQ_REL);
        rd->gnt->nr_pinned--;
    }
}

/* The granting domain by id. trapless itself is domain 0, the toolstack: a domain with
 * a table in which it grants nothing, so any entry of it is Xen's "bad flags". */
static int16_t granter(uint16_t domid, struct hv_domain **rd)
{
    *rd = hv_domain_lookup(domid);
    if (*rd && (*rd)->gnt)
        return GNTST_okay;
    if (domid == 0)
        return GNTST_general_error;     /* an entry of the toolstack's: never granted */
    return GNTST_bad_domain;
}

/* ---- the backend API (grant_table.h) ---- */

int16_t hv_grant_acquire(uint16_t granter_id, uint32_t ref, uint16_t user, int write,
                         struct hv_grant_use *use)
{
    struct hv_domain *rd;
    uint64_t frame;
    int16_t st;

    memset(use, 0, sizeof(*use));
    pthread_mutex_lock(&gnt_lock);
    st = granter(granter_id, &rd);
    if (st == GNTST_okay && ref >= nr_entries(rd->gnt))
        st = GNTST_bad_gntref;
    if (st == GNTST_okay)
        st = pin(rd, ref, user, write, PIN_HOST, &frame);
    if (st == GNTST_okay) {
        /* a mapping of its own: it outlives the granter's if the granter goes away */
        void *p = mmap(NULL, HV_PAGE_SIZE, PROT_READ | (write ? PROT_WRITE : 0), MAP_SHARED,
                       rd->ram_fd, (off_t)(frame << HV_PAGE_SHIFT));
        if (p == MAP_FAILED) {
            unpin(rd, ref, write, PIN_HOST);
            st = GNTST_general_error;
        } else {
            use->page = p;
            use->granter = granter_id;
            use->ref = ref;
            use->write = write;
        }
    }
    pthread_mutex_unlock(&gnt_lock);
    return st;
}

void hv_grant_release(struct hv_grant_use *use)
{
    struct hv_domain *rd;
    if (!use->page)
        return;
    munmap(use->page, HV_PAGE_SIZE);
    pthread_mutex_lock(&gnt_lock);
    if (granter(use->granter, &rd) == GNTST_okay)
        unpin(rd, use->ref, use->write, PIN_HOST);
    pthread_mutex_unlock(&gnt_lock);
    use->page = NULL;
}

int16_t hv_grant_pin_own(struct hv_domain *d, const uint32_t *refs, unsigned n, uint16_t user,
                         int write, uint8_t **pages)
{
    int16_t st = GNTST_okay;
    unsigned i;

    pthread_mutex_lock(&gnt_lock);
    for (i = 0; i < n; i++) {
        uint64_t frame;
        if (!d->gnt)
            st = GNTST_bad_domain;
        else if (refs[i] >= nr_entries(d->gnt))
            st = GNTST_bad_gntref;
        else
            st = pin(d, refs[i], user, write, PIN_HOST, &frame);
        if (st != GNTST_okay)
            break;
        pages[i] = d->ram + (frame << HV_PAGE_SHIFT);
    }
    if (st != GNTST_okay)
        while (i--)
            unpin(d, refs[i], write, PIN_HOST);
    pthread_mutex_unlock(&gnt_lock);
    return st;
}

void hv_grant_unpin_own(struct hv_domain *d, const uint32_t *refs, unsigned n, int write)
{
    pthread_mutex_lock(&gnt_lock);
    for (unsigned i = 0; i < n; i++)
        unpin(d, refs[i], write, PIN_HOST);
    pthread_mutex_unlock(&gnt_lock);
}

int16_t hv_grant_copy(uint16_t granter_id, uint32_t ref, uint16_t user, int write,
                      uint32_t offset, void *buf, uint32_t len)
{
    struct hv_domain *rd;
    uint64_t frame;
    int16_t st;

    if (offset > HV_PAGE_SIZE || len > HV_PAGE_SIZE - offset)
        return GNTST_bad_copy_arg;
    pthread_mutex_lock(&gnt_lock);
    st = granter(granter_id, &rd);
    if (st == GNTST_okay)
        st = pin(rd, ref, user, write, PIN_HOST, &frame);
    if (st == GNTST_okay) {
        /* the lock keeps rd and its RAM: destruction takes it before unmapping */
        uint8_t *page = rd->ram + (frame << HV_PAGE_SHIFT) + offset;
        if (write)
            memcpy(page, buf, len);
        else
            memcpy(buf, page, len);
        unpin(rd, ref, write, PIN_HOST);
    }
    pthread_mutex_unlock(&gnt_lock);
    return st;
}

int hv_gnt_frame_granted(struct hv_domain *d, uint64_t gpfn)
{
    struct hv_grant_table *gt = d->gnt;
    int used = 0;
    if (!gt)
        return 0;
    pthread_mutex_lock(&gnt_lock);
    for (uint32_t r = 0; gt->nr_pinned && r < nr_entries(gt) && !used; r++)
        used = (gt->active[r].readers || gt->active[r].writers) && gt->active[r].frame == gpfn;
    pthread_mutex_unlock(&gnt_lock);
    return used;
}

/* ---- PVH: a guest frame shows another page of the memory file ---- */

/* Frame gpfn of d shows page `page` of from's memory file. A read-only grant is mapped
 * privately: the guest's page tables (PVH, or a second PV entry for a window frame) may
 * let it store there, and its stores must never reach the granter; they go to a copy
 * of its own (Xen drops them). Never read-only on the host: Unicorn would fault. */
static int overlay(struct hv_domain *d, uint64_t gpfn, struct hv_domain *from, uint64_t page,
                   int readonly)
{
    void *at = d->ram + (gpfn << HV_PAGE_SHIFT);
    void *p = mmap(at, HV_PAGE_SIZE, PROT_READ | PROT_WRITE,
                   (readonly ? MAP_PRIVATE : MAP_SHARED) | MAP_FIXED,
                   from->ram_fd, (off_t)(page << HV_PAGE_SHIFT));
    return p == at ? 0 : -1;
}

static int restore(struct hv_domain *d, uint64_t gpfn)
{
    return overlay(d, gpfn, d, gpfn, 0);
}

/* Is gpfn in the PVH hole: beyond RAM and the grant region, below HV_PVH_PLACE_LIMIT,
 * neither the local APIC nor the last page below 4 GiB (bt's own)? A guest may place
 * table frames there. */
static int in_hole(const struct hv_domain *d, uint64_t gpfn)
{
    uint64_t first = (d->ram_bytes + d->gnt_bytes) >> HV_PAGE_SHIFT;
    return gpfn >= first && gpfn < HV_PVH_PLACE_LIMIT >> HV_PAGE_SHIFT &&
           gpfn != HV_LAPIC_GPA >> HV_PAGE_SHIFT &&
           gpfn != ((1ULL << 32) >> HV_PAGE_SHIFT) - 1;
}

/* Frame gpfn no longer shows table frame i: its RAM comes back (nothing was over a
 * frame in the hole). */
static int unplace(struct hv_domain *d, uint64_t i)
{
    uint64_t was = d->gnt->placed[i];
    d->gnt->placed[i] = INVALID_GFN;
    return was == INVALID_GFN || was >= nr_ram_frames(d) ? 0 : restore(d, was);
}

/* Xen's XENMAPSPACE_grant_table for a translated guest: table frame idx (status frame
 * with XENMAPIDX_grant_table_status) appears at gpfn, in place of the RAM there or in
 * the hole above RAM. Linux built with CONFIG_XEN_UNPOPULATED_ALLOC takes such gpfns:
 * a free 128 MiB-aligned stretch of its physical address space (Debian's 6.1 takes
 * the one at 4 GiB), its frames handed out from the top. Xen's p2m takes any gfn;
 * trapless takes RAM and the hole up to HV_PVH_PLACE_LIMIT, where the engines' MMIO
 * path reaches the frame (hv_gnt_hole_access). */
int64_t hv_gnt_add_to_physmap(struct hv_domain *d, uint64_t idx, uint64_t gpfn)
{
    struct hv_grant_table *gt = d->gnt;
    uint64_t i;
    int64_t rc = 0;

    if (d->guest_type != HV_GUEST_PVH)
        return -XEN_EINVAL;         /* PV maps the frames setup_table names */
    /* Any frame of the domain's RAM, ballooned out or not (Linux places its table in
     * frames it gave back first), but not the page-table pool or shared_info. */
    if (gpfn < d->mm.nr_pages ? hv_mm_in_pool(&d->mm, gpfn) ||
                                gpfn == d->shared_info_gpa >> HV_PAGE_SHIFT
                              : !in_hole(d, gpfn))
        return -XEN_EINVAL;
    pthread_mutex_lock(&gnt_lock);
    /* Xen (gnttab_map_frame_begin): the status bit means a status frame only in v2; in
     * v1 the index is a shared frame's, far beyond the limit. Either grows the table. */
    if (gt->version == 2 && (idx & XENMAPIDX_grant_table_status)) {
        idx &= ~(uint64_t)XENMAPIDX_grant_table_status;
        if (idx >= HV_GNT_STATUS_FRAMES) {
            rc = -XEN_EINVAL;
            goto out;
        }
        /* enough shared frames for status frame idx to exist: 8 per status frame */
        if (idx >= nr_status_frames(gt))
            gt->nr_frames = (uint32_t)(idx + 1) * (STATUS_PER_FRAME / V2_PER_FRAME);
        i = HV_GNT_MAX_FRAMES + idx;
    } else {
        if (idx >= HV_GNT_MAX_FRAMES) {
            rc = -XEN_EINVAL;
            goto out;
        }
        if (idx >= gt->nr_frames)
            gt->nr_frames = (uint32_t)idx + 1;  /* Xen grows the table to reach it */
        i = idx;
    }
    if (gt->placed[i] == gpfn)
        goto out;
    /* As in Xen's p2m, the gfn now shows this frame only: another table frame there
     * is taken off it, and this frame leaves where it was. */
    for (uint64_t j = 0; j < HV_GNT_MAX_FRAMES + HV_GNT_STATUS_FRAMES; j++)
        if (j != i && gt->placed[j] == gpfn)
            gt->placed[j] = INVALID_GFN;
    if (unplace(d, i) < 0 || (gpfn < nr_ram_frames(d) && overlay(d, gpfn, d, nr_ram_frames(d) + i, 0) < 0))
        rc = -XEN_ENOMEM;
    else
        gt->placed[i] = gpfn;
out:
    pthread_mutex_unlock(&gnt_lock);
    return rc;
}

/* An access of a PVH guest to gpa in the hole: 1 and done if a table frame is placed
 * there, else 0. The engines come here through their MMIO path, one load or store at a
 * time (size 1-8, within the page), so a guest's cmpxchg on a grant entry there is a
 * load and a store, not atomic against a backend thread's flag update in between; the
 * store is one atomic write of its size. */
int hv_gnt_hole_access(struct hv_domain *d, uint64_t gpa, int size, int is_write, uint8_t *data)
{
    struct hv_grant_table *gt = d->gnt;
    uint64_t gpfn = gpa >> HV_PAGE_SHIFT, offset = gpa & (HV_PAGE_SIZE - 1);
    int found = 0;

    if (!gt || d->guest_type != HV_GUEST_PVH || size < 1 || size > 8 ||
        offset + (uint64_t)size > HV_PAGE_SIZE)
        return 0;
    pthread_mutex_lock(&gnt_lock);
    for (uint64_t i = 0; i < HV_GNT_MAX_FRAMES + HV_GNT_STATUS_FRAMES && !found; i++) {
        if (gt->placed[i] != gpfn)
            continue;
        uint8_t *at = region_frame(d, i) + offset;
        if (!is_write)
            memcpy(data, at, (size_t)size);
        else if (size == 8 && !(offset & 7))
            __atomic_store_n((uint64_t *)at, *(uint64_t *)data, __ATOMIC_SEQ_CST);
        else if (size == 4 && !(offset & 3))
            __atomic_store_n((uint32_t *)at, *(uint32_t *)data, __ATOMIC_SEQ_CST);
        else if (size == 2 && !(offset & 1))
            __atomic_store_n((uint16_t *)at, *(uint16_t *)data, __ATOMIC_SEQ_CST);
        else
            memcpy(at, data, (size_t)size);
        found = 1;
    }
    pthread_mutex_unlock(&gnt_lock);
    return found;
}

/* ---- map and unmap ---- */

/* A window frame goes back to showing the domain's own (unused) page. */
static void window_free(struct hv_domain *d, int window)
{
    restore(d, nr_ram_frames(d) + HV_GNT_WINDOW_BASE + (uint64_t)window);
    d->gnt->window_used[window] = 0;
}

static int is_pvh(const struct hv_domain *d)
{
    return d->guest_type == HV_GUEST_PVH;
}

/* The PTE a PV host mapping writes: Xen's grant flags (readonly, application_map, the
 * guest-available bits from flag bit 16 up) and accessed/dirty. */
static uint64_t grant_pte(uint64_t frame, uint32_t flags)
{
    return (frame << HV_PAGE_SHIFT) | PTE_P | PTE_A | PTE_D |
           ((flags & GNTMAP_readonly) ? 0 : PTE_RW) |
           ((flags & GNTMAP_application_map) ? PTE_US : 0) |
           ((uint64_t)((flags >> 16) & 7) << 9);
}

/* Where a PV host mapping's L1 entry is: host_addr is a linear address, or with
 * contains_pte the entry's own machine address (Xen: it must be aligned). */
static int pv_pte_addr(struct hv_vcpu *v, uint64_t host_addr, uint32_t flags, uint64_t *pte)
{
    if (flags & GNTMAP_contains_pte) {
        *pte = host_addr;
        return hv_mm_is_l1e(v->dom, host_addr) ? 0 : -1;
    }
    return hv_mm_l1e_of_va(v, host_addr, pte) < 0 ? -1 : 0;
}

static void map_one(struct hv_vcpu *v, struct gnttab_map_grant_ref *op)
{
    struct hv_domain *ld = v->dom, *rd;
    struct hv_grant_table *lgt = ld->gnt;
    uint32_t handle;
    int write = !(op->flags & GNTMAP_readonly), window = -1, host_pinned = 0, device_pinned = 0;
    uint64_t frame, pte, pte_frame;
    int16_t st;

    if (!(op->flags & (GNTMAP_host_map | GNTMAP_device_map))) {
        op->status = GNTST_bad_gntref;          /* Xen's answer to "bad flags" */
        return;
    }
    if (is_pvh(ld) && (op->flags & (GNTMAP_device_map | GNTMAP_application_map |
                                    GNTMAP_contains_pte))) {
        op->status = GNTST_general_error;       /* no device mappings in HVM */
        return;
    }
    st = granter(op->dom, &rd);
    if (st != GNTST_okay) {
        op->status = st;
        return;
    }
    for (handle = 0; handle < HV_GNT_MAX_MAPTRACK && lgt->maptrack[handle].flags; handle++)
        ;
    if (handle == HV_GNT_MAX_MAPTRACK) {
        op->status = GNTST_no_space;
        return;
    }
    if (op->flags & GNTMAP_host_map) {
        st = pin(rd, op->ref, (uint16_t)ld->domid, write, PIN_HOST, &frame);
        host_pinned = st == GNTST_okay;
    }
    if (st == GNTST_okay && (op->flags & GNTMAP_device_map)) {
        st = pin(rd, op->ref, (uint16_t)ld->domid, write, PIN_DEVICE, &frame);
        device_pinned = st == GNTST_okay;
    }
    pte_frame = frame;
    if (st == GNTST_okay && !is_pvh(ld) && rd != ld) {
        /* a foreign page: a window frame of ours shows it */
        for (window = 0; window < HV_GNT_WINDOW_FRAMES && lgt->window_used[window]; window++)
            ;
        pte_frame = nr_ram_frames(ld) + HV_GNT_WINDOW_BASE + (uint64_t)window;
        if (window == HV_GNT_WINDOW_FRAMES || overlay(ld, pte_frame, rd, frame, !write) < 0) {
            window = -1;
            st = GNTST_no_device_space;
        } else {
            lgt->window_used[window] = 1;
        }
    }
    if (st == GNTST_okay && (op->flags & GNTMAP_host_map)) {
        if (is_pvh(ld)) {
            uint64_t gpfn = op->host_addr >> HV_PAGE_SHIFT;
            if (!hv_mm_frame_usable(ld, gpfn) || gpfn == ld->shared_info_gpa >> HV_PAGE_SHIFT ||
                overlay(ld, gpfn, rd, frame, !write) < 0)
                st = GNTST_general_error;
        } else if (pv_pte_addr(v, op->host_addr, op->flags, &pte) < 0 ||
                   hv_mm_set_l1e(ld, pte, grant_pte(pte_frame, op->flags)) < 0) {
            st = GNTST_general_error;
        } else {
            v->ops->flush_tlb(v);
        }
    }
    if (st != GNTST_okay) {
        if (window >= 0)
            window_free(ld, window);
        if (host_pinned)
            unpin(rd, op->ref, write, PIN_HOST);
        if (device_pinned)
            unpin(rd, op->ref, write, PIN_DEVICE);
        op->status = st;
        return;
    }
    lgt->maptrack[handle] = (struct maptrack){
        .flags = op->flags & (GNTMAP_host_map | GNTMAP_device_map | GNTMAP_readonly |
                              GNTMAP_contains_pte),
        .dom = op->dom, .ref = op->ref, .host_addr = op->host_addr, .frame = frame,
        .pte_frame = pte_frame, .window = window,
    };
    if (op->flags & GNTMAP_device_map)      /* machine == guest-physical here */
        op->dev_bus_addr = pte_frame << HV_PAGE_SHIFT;
    op->handle = handle;
    op->status = GNTST_okay;
}

/* Take the host mapping at host_addr down (new_addr: put the entry mapping new_addr
 * there instead, Xen's unmap_and_replace). It must still be the grant's mapping. */
static int16_t unmap_host(struct hv_vcpu *v, struct maptrack *m, uint64_t host_addr, uint64_t new_addr)
{
    struct hv_domain *ld = v->dom;
    uint64_t pte, e, want = grant_pte(m->pte_frame, m->flags);

    if (is_pvh(ld)) {
        if (new_addr || host_addr >> HV_PAGE_SHIFT != m->host_addr >> HV_PAGE_SHIFT)
            return GNTST_general_error;
        return restore(ld, host_addr >> HV_PAGE_SHIFT) < 0 ? GNTST_general_error : GNTST_okay;
    }
    if (pv_pte_addr(v, host_addr, m->flags, &pte) < 0)
        return GNTST_general_error;
    e = __atomic_load_n((uint64_t *)(ld->ram + pte), __ATOMIC_ACQUIRE);
    /* Xen (XSA-234): the entry must map the frame with the flags the map gave it */
    if ((e & PTE_ADDR) != (want & PTE_ADDR) || (e & (PTE_P | PTE_RW)) != (want & (PTE_P | PTE_RW)))
        return GNTST_general_error;
    if (new_addr) {
        uint64_t from;
        if (hv_mm_l1e_of_va(v, new_addr, &from) < 0 || hv_mm_move_l1e(ld, from, pte) < 0)
            return GNTST_general_error;
    } else if (hv_mm_set_l1e(ld, pte, 0) < 0) {
        return GNTST_general_error;
    }
    v->ops->flush_tlb(v);
    return GNTST_okay;
}

static int16_t unmap_one(struct hv_vcpu *v, uint32_t handle, uint64_t host_addr,
                         uint64_t dev_bus_addr, uint64_t new_addr)
{
    struct hv_grant_table *lgt = v->dom->gnt;
    struct hv_domain *rd;
    struct maptrack *m;
    int write;
    int16_t st;

    if (handle >= HV_GNT_MAX_MAPTRACK || !lgt->maptrack[handle].flags)
        return GNTST_bad_handle;
    m = &lgt->maptrack[handle];
    write = !(m->flags & GNTMAP_readonly);
    if (dev_bus_addr && (m->flags & GNTMAP_device_map) &&
        dev_bus_addr != m->pte_frame << HV_PAGE_SHIFT)
        return GNTST_bad_dev_addr;
    if (granter(m->dom, &rd) != GNTST_okay)
        rd = NULL;                  /* gone: its side of the grant went with it */
    if (host_addr && (m->flags & GNTMAP_host_map)) {
        st = unmap_host(v, m, host_addr, new_addr);
        if (st != GNTST_okay)
            return st;
        m->flags &= ~(uint32_t)GNTMAP_host_map;
        if (rd)
            unpin(rd, m->ref, write, PIN_HOST);
    }
    if (dev_bus_addr && (m->flags & GNTMAP_device_map)) {
        m->flags &= ~(uint32_t)GNTMAP_device_map;
        if (rd)
            unpin(rd, m->ref, write, PIN_DEVICE);
    }
    if (!(m->flags & (GNTMAP_host_map | GNTMAP_device_map))) {
        if (m->window >= 0)
            window_free(v->dom, m->window);
        m->flags = 0;
    }
    return GNTST_okay;
}

/* ---- copy ---- */

/* The domain one side of a copy names: Xen's gnttab_copy_lock_domain. A frame (no gref)
 * may be named only with DOMID_SELF itself, not the caller's own number. */
static int16_t copy_domain(struct hv_vcpu *v, uint16_t domid, int is_gref, struct hv_domain **d)
{
    if (domid != DOMID_SELF && !is_gref)
        return GNTST_permission_denied;
    *d = domid == DOMID_SELF ? v->dom : hv_domain_lookup(domid);
    return *d && (*d)->gnt ? GNTST_okay : GNTST_bad_domain;
}

/* Its frame: a grant ref pinned for the copy, or a frame of the caller's RAM (one it may
 * write, for the destination: never a page table, Xen's failed writable type). */
static int16_t copy_frame(struct hv_vcpu *v, struct hv_domain *d, const struct gnttab_copy_ptr *p,
                          int is_gref, int write, uint64_t *frame)
{
    if (is_gref)
        return pin(d, (uint32_t)p->u, (uint16_t)v->dom->domid, write, PIN_HOST, frame);
    if (p->u >= d->mm.nr_pages || !(d->mm.frames[p->u].flags & HV_FRAME_POPULATED))
        return GNTST_bad_page;
    if (write && !hv_mm_frame_usable(d, p->u))
        return GNTST_general_error;
    *frame = p->u;
    return GNTST_okay;
}

/* Xen's gnttab_copy_one, in its order: nothing to copy is done at once; both domains,
 * both frames, then the bounds. */
static void copy_one(struct hv_vcpu *v, struct gnttab_copy *op)
{
    int src_gref = op->flags & GNTCOPY_source_gref, dst_gref = op->flags & GNTCOPY_dest_gref;
    int src_pinned = 0, dst_pinned = 0;
    struct hv_domain *sd = NULL, *dd = NULL;
    uint64_t sf = 0, df = 0;
    int16_t st = GNTST_okay;

    if (!op->len) {
        op->status = GNTST_okay;
        return;
    }
    st = copy_domain(v, op->source.domid, src_gref, &sd);
    if (st == GNTST_okay)
        st = copy_domain(v, op->dest.domid, dst_gref, &dd);
    if (st == GNTST_okay) {
        st = copy_frame(v, sd, &op->source, src_gref, 0, &sf);
        src_pinned = st == GNTST_okay && src_gref;
    }
    if (st == GNTST_okay) {
        st = copy_frame(v, dd, &op->dest, dst_gref, 1, &df);
        dst_pinned = st == GNTST_okay && dst_gref;
    }
    if (st == GNTST_okay && (op->source.offset + op->len > HV_PAGE_SIZE ||
                             op->dest.offset + op->len > HV_PAGE_SIZE))
        st = GNTST_bad_copy_arg;
    if (st == GNTST_okay)
        memmove(dd->ram + (df << HV_PAGE_SHIFT) + op->dest.offset,
                sd->ram + (sf << HV_PAGE_SHIFT) + op->source.offset, op->len);
    if (dst_pinned)
        unpin(dd, (uint32_t)op->dest.u, 1, PIN_HOST);
    if (src_pinned)
        unpin(sd, (uint32_t)op->source.u, 0, PIN_HOST);
    op->status = st;
}

/* ---- table-wide ops ---- */

/* Xen lets a domain ask about itself only: another one is permission_denied. */
static int16_t self_only(struct hv_vcpu *v, uint16_t dom)
{
    struct hv_domain *d;
    if (dom == DOMID_SELF || dom == v->dom->domid)
        return GNTST_okay;
    return granter(dom, &d) == GNTST_bad_domain ? GNTST_bad_domain : GNTST_permission_denied;
}

/* The frame numbers the guest uses for table frame i (a status frame from
 * HV_GNT_MAX_FRAMES): PV maps the region frame, PVH names where it placed it. */
static uint64_t table_gfn(struct hv_domain *d, uint64_t i)
{
    return is_pvh(d) ? d->gnt->placed[i] : nr_ram_frames(d) + i;
}

static int64_t frame_list_op(struct hv_vcpu *v, uint64_t arg, uint32_t count, int status_frames)
{
    struct hv_grant_table *gt = v->dom->gnt;
    union { struct gnttab_setup_table s; struct gnttab_get_status_frames g; } op;
    uint32_t nr;
    uint16_t dom;
    uint64_t list;
    int16_t st;

    if (count != 1)
        return -XEN_EINVAL;
    if (hv_copy_from_guest(v, &op, arg, status_frames ? sizeof(op.g) : sizeof(op.s)) < 0)
        return -XEN_EFAULT;
    nr = status_frames ? op.g.nr_frames : op.s.nr_frames;
    dom = status_frames ? op.g.dom : op.s.dom;
    list = status_frames ? op.g.frame_list : op.s.frame_list;
    if (!hv_mm_range_ok(list, (uint64_t)nr * 8))
        return -XEN_EFAULT;
    st = self_only(v, dom);
    if (st == GNTST_okay && !status_frames && nr > HV_GNT_MAX_FRAMES)
        st = GNTST_general_error;       /* beyond the domain's limit */
    if (st == GNTST_okay && !status_frames && nr > gt->nr_frames)
        gt->nr_frames = nr;             /* grow */
    if (st == GNTST_okay && status_frames && nr > nr_status_frames(gt))
        st = GNTST_general_error;
    for (uint32_t i = 0; st == GNTST_okay && i < nr; i++) {
        uint64_t gfn = table_gfn(v->dom, status_frames ? HV_GNT_MAX_FRAMES + i : i);
        if (hv_copy_to_guest(v, list + i * 8ULL, &gfn, 8) < 0)
            st = GNTST_bad_virt_addr;
        else if (status_frames && i >= gt->status_shown)
            gt->status_shown = i + 1;
        else if (!status_frames && i >= gt->shared_shown)
            gt->shared_shown = i + 1;
    }
    if (hv_copy_to_guest(v, arg + (status_frames ? offsetof(struct gnttab_get_status_frames, status)
                                                 : offsetof(struct gnttab_setup_table, status)),
                         &st, sizeof(st)) < 0)
        return -XEN_EFAULT;
    return 0;
}

static int64_t query_size(struct hv_vcpu *v, uint64_t arg, uint32_t count)
{
    struct gnttab_query_size op;
    if (count != 1)
        return -XEN_EINVAL;
    if (hv_copy_from_guest(v, &op, arg, sizeof(op)) < 0)
        return -XEN_EFAULT;
    op.status = self_only(v, op.dom);
    if (op.status == GNTST_okay) {
        op.nr_frames = v->dom->gnt->nr_frames;
        op.max_nr_frames = HV_GNT_MAX_FRAMES;
    }
    return hv_copy_to_guest(v, arg, &op, sizeof(op)) < 0 ? -XEN_EFAULT : 0;
}

/* Switch between v1 and v2: refused while entries beyond the reserved ones are in use
 * or a status frame is still mapped (XSA-255); the reserved entries carry over. */
static int64_t set_version(struct hv_vcpu *v, uint64_t arg)
{
    struct hv_domain *d = v->dom;
    struct hv_grant_table *gt = d->gnt;
    struct gnttab_set_version op;
    struct grant_entry_v1 keep[GNTTAB_NR_RESERVED_ENTRIES];
    int64_t rc = 0;

    if (hv_copy_from_guest(v, &op, arg, sizeof(op)) < 0)
        return -XEN_EFAULT;
    if (op.version != 1 && op.version != 2)
        rc = -XEN_EINVAL;
    for (uint32_t r = GNTTAB_NR_RESERVED_ENTRIES; !rc && op.version != gt->version &&
                                                   r < nr_entries(gt); r++)
        if (gt->active[r].readers || gt->active[r].writers)
            rc = -XEN_EBUSY;
    for (uint32_t i = 0; !rc && op.version == 1 && gt->version == 2 && i < HV_GNT_STATUS_FRAMES; i++)
        if (gt->frame_maps[HV_GNT_MAX_FRAMES + i] || gt->placed[HV_GNT_MAX_FRAMES + i] != INVALID_GFN)
            rc = -XEN_EBUSY;            /* the guest still maps a status frame */
    if (!rc && op.version != gt->version) {
        for (uint32_t r = 0; r < GNTTAB_NR_RESERVED_ENTRIES; r++) {
            uint16_t flags = (uint16_t)*entry_header(d, r) | *status_word(d, r);
            keep[r] = (struct grant_entry_v1){ flags, (uint16_t)(*entry_header(d, r) >> 16),
                                               (uint32_t)entry_frame(d, r) };
            if (gt->version == 2 && ((flags & GTF_type_mask) != GTF_permit_access ||
                                     entry_frame(d, r) >> 32))
                memset(&keep[r], 0, sizeof(keep[r]));  /* not expressible in v1 */
        }
        memset(region_frame(d, 0), 0, HV_GNT_REGION_FRAMES * HV_PAGE_SIZE);
        gt->version = op.version;
        for (uint32_t r = 0; r < GNTTAB_NR_RESERVED_ENTRIES; r++) {
            uint16_t busy = keep[r].flags & (GTF_reading | GTF_writing);
            if (gt->version == 1) {
                ((struct grant_entry_v1 *)region_frame(d, 0))[r] = keep[r];
                continue;
            }
            ((struct grant_entry_v2 *)region_frame(d, 0))[r] = (struct grant_entry_v2){
                .flags = keep[r].flags & ~busy, .domid = keep[r].domid, .frame = keep[r].frame };
            *status_word(d, r) = busy;
        }
    }
    op.version = gt->version;
    if (hv_copy_to_guest(v, arg, &op, sizeof(op)) < 0)
        return -XEN_EFAULT;
    return rc;
}

static int64_t get_version(struct hv_vcpu *v, uint64_t arg)
{
    struct gnttab_get_version op;
    struct hv_domain *d;
    if (hv_copy_from_guest(v, &op, arg, sizeof(op)) < 0)
        return -XEN_EFAULT;
    if (op.dom != DOMID_SELF && op.dom != v->dom->domid)
        return granter(op.dom, &d) == GNTST_bad_domain ? -XEN_ESRCH : -XEN_EPERM;
    op.version = v->dom->gnt->version;
    return hv_copy_to_guest(v, arg, &op, sizeof(op)) < 0 ? -XEN_EFAULT : 0;
}

static int16_t swap_one(struct hv_domain *d, uint32_t a, uint32_t b)
{
    struct hv_grant_table *gt = d->gnt;
    size_t size = gt->version == 1 ? sizeof(struct grant_entry_v1) : sizeof(struct grant_entry_v2);
    uint8_t tmp[sizeof(struct grant_entry_v2)];
    if (a >= nr_entries(gt) || b >= nr_entries(gt))
        return GNTST_bad_gntref;
    if (gt->active[a].readers || gt->active[a].writers || gt->active[b].readers ||
        gt->active[b].writers)
        return GNTST_eagain;            /* Xen: an entry in use cannot move */
    if (a == b)
        return GNTST_okay;
    memcpy(tmp, entry_header(d, a), size);
    memcpy(entry_header(d, a), entry_header(d, b), size);
    memcpy(entry_header(d, b), tmp, size);
    if (gt->version == 2) {
        uint16_t s = *status_word(d, a);
        *status_word(d, a) = *status_word(d, b);
        *status_word(d, b) = s;
    }
    return GNTST_okay;
}

/* Xen's cache_flush: on x86 the caches are coherent, so a valid request is a no-op;
 * the checks are Xen's (offset/length/op, a frame of one's own). */
static int64_t cache_flush_one(struct hv_vcpu *v, const struct gnttab_cache_flush *op)
{
    if (op->offset >= HV_PAGE_SIZE || op->length > HV_PAGE_SIZE ||
        op->offset + op->length > HV_PAGE_SIZE ||
        (op->op & ~(uint32_t)(GNTTAB_CACHE_INVAL | GNTTAB_CACHE_CLEAN)))
        return -XEN_EINVAL;
    if (op->length == 0 || op->op == 0)
        return 0;
    if (op->op & GNTTAB_CACHE_SOURCE_GREF)
        return -XEN_EOPNOTSUPP;
    if (!hv_mm_frame_usable(v->dom, op->a >> HV_PAGE_SHIFT))
        return (op->a >> HV_PAGE_SHIFT) < nr_ram_frames(v->dom) ? -XEN_EPERM : -XEN_EINVAL;
    return 0;
}

/* ---- the hypercall ---- */

/* The ops that take an array: each element in, done, out (its status field). */
#define FOR_EACH(type, body)                                                        \
    for (uint32_t i = 0; i < count; i++) {                                          \
        type op;                                                                    \
        uint64_t at = arg + (uint64_t)i * sizeof(op);                               \
        if (hv_copy_from_guest(v, &op, at, sizeof(op)) < 0) {                       \
            rc = -XEN_EFAULT;                                                       \
            break;                                                                  \
        }                                                                           \
        body;                                                                       \
        if (hv_copy_to_guest(v, at, &op, sizeof(op)) < 0) {                         \
            rc = -XEN_EFAULT;                                                       \
            break;                                                                  \
        }                                                                           \
    }

int64_t do_grant_table_op(struct hv_vcpu *v, const struct hv_hcall *h)
{
    uint32_t cmd = (uint32_t)h->a1, count = (uint32_t)h->a3;
    uint64_t arg = h->a2;
    int64_t rc = 0;

    if (!v->dom->gnt)
        return -XEN_ENOSYS;
    if ((int32_t)count < 0)
        return -XEN_EINVAL;
    if ((cmd & GNTTABOP_CMD_MASK) != GNTTABOP_cache_flush && (cmd & ~GNTTABOP_CMD_MASK))
        return -XEN_EINVAL;         /* continuation bits: only cache_flush has them */
    cmd &= GNTTABOP_CMD_MASK;
    pthread_mutex_lock(&gnt_lock);
    switch (cmd) {
    case GNTTABOP_map_grant_ref:
        FOR_EACH(struct gnttab_map_grant_ref, map_one(v, &op));
        break;
    case GNTTABOP_unmap_grant_ref:
        FOR_EACH(struct gnttab_unmap_grant_ref,
                 op.status = unmap_one(v, op.handle, op.host_addr, op.dev_bus_addr, 0));
        break;
    case GNTTABOP_unmap_and_replace:
        FOR_EACH(struct gnttab_unmap_and_replace,
                 op.status = unmap_one(v, op.handle, op.host_addr, 0, op.new_addr));
        break;
    case GNTTABOP_copy:
        FOR_EACH(struct gnttab_copy, copy_one(v, &op));
        break;
    case GNTTABOP_swap_grant_ref:
        FOR_EACH(struct gnttab_swap_grant_ref, op.status = swap_one(v->dom, op.ref_a, op.ref_b));
        break;
    case GNTTABOP_setup_table:
        rc = frame_list_op(v, arg, count, 0);
        break;
    case GNTTABOP_get_status_frames:
        rc = frame_list_op(v, arg, count, 1);
        break;
    case GNTTABOP_query_size:
        rc = query_size(v, arg, count);
        break;
    case GNTTABOP_set_version:
        rc = set_version(v, arg);
        break;
    case GNTTABOP_get_version:
        rc = get_version(v, arg);
        break;
    case GNTTABOP_cache_flush:
        for (uint32_t i = 0; i < count && !rc; i++) {
            struct gnttab_cache_flush op;
            if (hv_copy_from_guest(v, &op, arg + (uint64_t)i * sizeof(op), sizeof(op)) < 0)
                rc = -XEN_EFAULT;
            else
                rc = cache_flush_one(v, &op);
        }
        break;
    default:
        rc = -XEN_ENOSYS;           /* dump_table, transfer: not in trapless */
    }
    pthread_mutex_unlock(&gnt_lock);
    return rc;
}

/* The domain goes away: the grants it has mapped are its no more (Xen's
 * gnttab_release_mappings), so their entries in the granters' tables come free. */
void hv_gnt_destroy(struct hv_domain *d)
{
    pthread_mutex_lock(&gnt_lock);
    for (uint32_t h = 0; d->gnt && h < HV_GNT_MAX_MAPTRACK; h++) {
        struct maptrack *m = &d->gnt->maptrack[h];
        struct hv_domain *rd;
        int write = !(m->flags & GNTMAP_readonly);
        if (!m->flags || granter(m->dom, &rd) != GNTST_okay || rd == d)
            continue;
        if (m->flags & GNTMAP_host_map)
            unpin(rd, m->ref, write, PIN_HOST);
        if (m->flags & GNTMAP_device_map)
            unpin(rd, m->ref, write, PIN_DEVICE);
    }
    if (d->gnt) {
        free(d->gnt->active);
        free(d->gnt->maptrack);
        free(d->gnt);
        d->gnt = NULL;
    }
    pthread_mutex_unlock(&gnt_lock);
}
