/*
 * blkback.c - the block backend: trapless's end of a domain's virtual block devices.
 *
 * Xen gives a domU a disk as a split device (io/blkif.h): the frontend in the guest puts
 * requests on a shared ring of granted pages and notifies an event channel; the backend
 * in dom0 does the I/O on the disk image, puts responses on the same ring and notifies
 * back. The two find each other through xenstore (the XenbusState handshake). Here dom0
 * is trapless and the disk a raw image file: each device has a thread of its own that
 * sleeps on an eventfd, woken by the frontend's notifications (events.c calls wake()) and
 * by changes to the frontend's xenstore directory (a host watch). The vCPU thread never
 * does the I/O, and no Python runs on the data path.
 *
 * The guest writes the ring and the requests, so: indexes are read once and a producer
 * more than a ring ahead stops the ring being served; each request is copied out of the
 * ring before it is looked at; every segment's grant is pinned (checked against this
 * device's frontend and the direction of the I/O) before a byte moves, and its sectors
 * must lie in the disk; a read-only disk refuses writes, as blkback does. Acknowledged
 * writes are the file's: a flush or barrier is an fdatasync before its response, and
 * the file is synced when the device goes away (the domain destroyed mid-I/O).
 *
 * Throughput: a request's pages are used in place, in the frontend's RAM (this thread
 * ends before that RAM goes), its segments are one preadv/pwritev, each response is
 * published as it is made, and events either way only where the other end's req_event
 * or rsp_event asks for one (io/ring.h): a frontend that keeps the ring full keeps this
 * thread busy without an event per request.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/uio.h>
#include <unistd.h>

#include "hv.h"
#include "backend.h"

#define RING_PAGE_ORDER_MAX 4           /* max-ring-page-order we offer (Linux: 4) */
#define RING_PAGES_MAX      (1u << RING_PAGE_ORDER_MAX)
#define INDIRECT_SEGS_MAX   256         /* feature-max-indirect-segments we offer */
#define SEGS_MAX            INDIRECT_SEGS_MAX

struct seg {
    uint32_t gref;
    uint8_t  first, last;               /* sectors of the page, inclusive */
};

struct blkback {
    struct blkback *next;               /* every device, under devices_lock */
    struct hv_domain *d;
    uint16_t domid;
    uint32_t devid;
    int fd, readonly;
    uint64_t sectors;                   /* 512-byte sectors in the image */
    char front[HV_BK_PATH_BYTES], back[HV_BK_PATH_BYTES];
    int wake_fd;                        /* eventfd: notifications and xenstore changes */
    pthread_t thread;
    volatile int stopping;

    /* the connection (the thread's own) */
    int state;                          /* ours: XenbusState* */
    uint32_t port;                      /* the frontend's, bound to us; 0 if none */
    struct hv_grant_use ring[RING_PAGES_MAX];
    uint32_t ring_pages, nr_ents;       /* nr_ents: a power of two */
    uint32_t req_cons, rsp_prod;        /* ours: the ring's copies are the guest's to change */
    uint32_t rsp_pushed;                /* the rsp_prod last published */
    uint32_t rsp_settled;               /* responses before it: notified, or known unwanted */

    pthread_mutex_t stats_lock;
    struct hv_blkback_stats stats;
};

static pthread_mutex_t devices_lock = PTHREAD_MUTEX_INITIALIZER;
static struct blkback *devices;

static void wake(void *arg)
{
    struct blkback *b = arg;
    uint64_t one = 1;
    if (write(b->wake_fd, &one, sizeof(one)) < 0) {
        /* the counter is full: the thread is awake already */
    }
}

static void count(struct blkback *b, uint64_t *field, uint64_t n)
{
    pthread_mutex_lock(&b->stats_lock);
    *field += n;
    pthread_mutex_unlock(&b->stats_lock);
}

static void set_state(struct blkback *b, int state)
{
    b->state = state;
    hv_bk_printf(b->back, "state", "%d", state);
}

/* ---- the ring ---- */

/* Copy n bytes at byte offset off of the ring's pages out of (to_ring 0) or into it. */
static void ring_copy(struct blkback *b, uint64_t off, void *buf, size_t n, int to_ring)
{
    uint8_t *p = buf;
    while (n) {
        uint8_t *page = b->ring[off / HV_PAGE_SIZE].page;
        size_t in = off % HV_PAGE_SIZE, k = HV_PAGE_SIZE - in < n ? HV_PAGE_SIZE - in : n;
        if (to_ring)
            memcpy(page + in, p, k);
        else
            memcpy(p, page + in, k);
        p += k, off += k, n -= k;
    }
}

static uint64_t slot(struct blkback *b, uint32_t idx)
{
    return BLKIF_RING_HEADER + (uint64_t)(idx & (b->nr_ents - 1)) * sizeof(struct blkif_request);
}

static volatile struct blkif_sring_header *sring(struct blkback *b)
{
    return (volatile struct blkif_sring_header *)b->ring[0].page;
}

static void release_all(struct hv_grant_use *use, unsigned n)
{
    for (unsigned i = 0; i < n; i++)
        hv_grant_release(&use[i]);
}

static int sync_file(struct blkback *b)
{
    count(b, &b->stats.flushes, 1);
    return fdatasync(b->fd) == 0 ? 0 : -1;
}

/* Reads and writes: every grant pinned and every sector checked before any I/O. The
 * granted pages are used where they are, in the frontend's RAM (this thread is joined
 * before that RAM goes), and the segments are one preadv/pwritev: a request costs one
 * lock round for its grants and one system call, whatever its size. */
static int16_t do_rw(struct blkback *b, int write, uint64_t sector, const struct seg *segs,
                     unsigned nsegs, int flush_before, int sync_after)
{
    static __thread uint32_t refs[SEGS_MAX];
    static __thread uint8_t *pages[SEGS_MAX];
    static __thread struct iovec iov[SEGS_MAX];
    uint64_t total = 0;
    int16_t status = BLKIF_RSP_OKAY;
    ssize_t done;

    if (nsegs == 0 || nsegs > SEGS_MAX)
        return BLKIF_RSP_ERROR;
    if (write && b->readonly)
        return BLKIF_RSP_ERROR;         /* blkback: a write to a read-only device fails */
    for (unsigned i = 0; i < nsegs; i++) {
        if (segs[i].first > segs[i].last || segs[i].last >= BLKIF_SECTORS_PER_PAGE)
            return BLKIF_RSP_ERROR;
        total += (uint64_t)(segs[i].last - segs[i].first + 1);
        refs[i] = segs[i].gref;
    }
    if (sector > b->sectors || total > b->sectors - sector)
        return BLKIF_RSP_ERROR;
    /* a read fills the frontend's pages: it must have granted us write access */
    if (hv_grant_pin_own(b->d, refs, nsegs, 0, write ? HV_GRANT_READ : HV_GRANT_WRITE,
                         pages) != GNTST_okay) {
        count(b, &b->stats.bad_grants, 1);
        return BLKIF_RSP_ERROR;
    }
    for (unsigned i = 0; i < nsegs; i++) {
        iov[i].iov_base = pages[i] + segs[i].first * BLKIF_SECTOR_SIZE;
        iov[i].iov_len = (size_t)(segs[i].last - segs[i].first + 1) * BLKIF_SECTOR_SIZE;
    }
    if (flush_before && sync_file(b) < 0)
        status = BLKIF_RSP_ERROR;
    if (status == BLKIF_RSP_OKAY) {
        off_t pos = (off_t)(sector * BLKIF_SECTOR_SIZE);
        done = write ? pwritev(b->fd, iov, (int)nsegs, pos) : preadv(b->fd, iov, (int)nsegs, pos);
        if (done != (ssize_t)(total * BLKIF_SECTOR_SIZE))
            status = BLKIF_RSP_ERROR;   /* short: the file shrank, or the host's disk failed */
    }
    if (status == BLKIF_RSP_OKAY && sync_after && sync_file(b) < 0)
        status = BLKIF_RSP_ERROR;
    hv_grant_unpin_own(b->d, refs, nsegs, write ? HV_GRANT_READ : HV_GRANT_WRITE);
    if (status == BLKIF_RSP_OKAY)
        count(b, write ? &b->stats.sectors_written : &b->stats.sectors_read, total);
    return status;
}

static int16_t do_discard(struct blkback *b, const struct blkif_request_discard *r)
{
    if (b->readonly || (r->flag & BLKIF_DISCARD_SECURE))
        return BLKIF_RSP_EOPNOTSUPP;    /* not offered: no feature-discard(-secure) */
    if (r->sector_number > b->sectors || r->nr_sectors > b->sectors - r->sector_number)
        return BLKIF_RSP_ERROR;
    if (r->nr_sectors && fallocate(b->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE,
                                   (off_t)(r->sector_number * BLKIF_SECTOR_SIZE),
                                   (off_t)(r->nr_sectors * BLKIF_SECTOR_SIZE)) < 0)
        return errno == EOPNOTSUPP ? BLKIF_RSP_EOPNOTSUPP : BLKIF_RSP_ERROR;
    return BLKIF_RSP_OKAY;
}

/* The segments an indirect request names, read from its granted pages. */
static int16_t do_indirect(struct blkback *b, const struct blkif_request_indirect *r)
{
    static __thread struct seg segs[SEGS_MAX];
    unsigned n = r->nr_segments;
    unsigned pages = (n + BLKIF_SEGMENTS_PER_INDIRECT_PAGE - 1) / BLKIF_SEGMENTS_PER_INDIRECT_PAGE;

    if ((r->indirect_op != BLKIF_OP_READ && r->indirect_op != BLKIF_OP_WRITE) ||
        n == 0 || n > INDIRECT_SEGS_MAX)
        return BLKIF_RSP_ERROR;
    for (unsigned p = 0, i = 0; p < pages; p++) {
        uint32_t ref = r->indirect_grefs[p];
        uint8_t *page;
        if (hv_grant_pin_own(b->d, &ref, 1, 0, HV_GRANT_READ, &page) != GNTST_okay) {
            count(b, &b->stats.bad_grants, 1);
            return BLKIF_RSP_ERROR;
        }
        for (unsigned k = 0; k < BLKIF_SEGMENTS_PER_INDIRECT_PAGE && i < n; k++, i++) {
            struct blkif_request_segment s;
            memcpy(&s, page + k * sizeof(s), sizeof(s));   /* once: the guest may change it */
            segs[i].gref = s.gref;
            segs[i].first = s.first_sect;
            segs[i].last = s.last_sect;
        }
        hv_grant_unpin_own(b->d, &ref, 1, HV_GRANT_READ);
    }
    return do_rw(b, r->indirect_op == BLKIF_OP_WRITE, r->sector_number, segs, n, 0, 0);
}

static int16_t do_request(struct blkback *b, const struct blkif_request *r)
{
    struct seg segs[BLKIF_MAX_SEGMENTS_PER_REQUEST];
    unsigned n = r->nr_segments;

    switch (r->operation) {
    case BLKIF_OP_INDIRECT:
        return do_indirect(b, (const struct blkif_request_indirect *)r);
    case BLKIF_OP_DISCARD:
        return do_discard(b, (const struct blkif_request_discard *)r);
    case BLKIF_OP_READ: case BLKIF_OP_WRITE: case BLKIF_OP_WRITE_BARRIER:
    case BLKIF_OP_FLUSH_DISKCACHE:
        break;
    default:
        return BLKIF_RSP_EOPNOTSUPP;
    }
    if (n > BLKIF_MAX_SEGMENTS_PER_REQUEST)
        return BLKIF_RSP_ERROR;
    for (unsigned i = 0; i < n; i++) {
        segs[i].gref = r->seg[i].gref;
        segs[i].first = r->seg[i].first_sect;
        segs[i].last = r->seg[i].last_sect;
    }
    switch (r->operation) {
    case BLKIF_OP_READ:
        return do_rw(b, 0, r->sector_number, segs, n, 0, 0);
    case BLKIF_OP_WRITE:
        return do_rw(b, 1, r->sector_number, segs, n, 0, 0);
    default:
        /* a flush or barrier with no data is a sync; with data (Linux sends a preflush
         * write as FLUSH_DISKCACHE), the sync comes first, and a barrier's data is on
         * the disk before its response */
        if (n == 0)
            return sync_file(b) == 0 ? BLKIF_RSP_OKAY : BLKIF_RSP_ERROR;
        return do_rw(b, 1, r->sector_number, segs, n, 1, r->operation == BLKIF_OP_WRITE_BARRIER);
    }
}

/* The operation a response names. io/blkif.h says it is copied from the request, but
 * the backend of Xen's dom0 (Linux's xen-blkback, dispatch_rw_block_io) answers an
 * indirect request with its indirect_op, the READ or WRITE it carried, and Linux's
 * blkfront (blkif_interrupt) checks that: any other value, BLKIF_OP_INDIRECT included,
 * is a broken backend to it, and it disables the disk with every request still on it
 * unanswered for ever. We follow the code. */
static uint8_t response_operation(const struct blkif_request *r)
{
    if (r->operation == BLKIF_OP_INDIRECT)
        return ((const struct blkif_request_indirect *)r)->indirect_op;
    return r->operation;
}

/* Did the frontend ask to be told of a response past old (its rsp_event)? */
static int response_wanted(struct blkback *b, uint32_t old)
{
    return b->rsp_prod - sring(b)->rsp_event < b->rsp_prod - old;
}

static void notify_frontend(struct blkback *b)
{
    hv_evtchn_backend_notify(b->d, b->port);
    b->rsp_settled = b->rsp_prod;
    count(b, &b->stats.notifies, 1);
}

/* Publish the responses made so far and notify the frontend if it asked to be told of
 * one of them (io/ring.h's RING_PUSH_RESPONSES_AND_CHECK_NOTIFY): a frontend busy
 * consuming leaves rsp_event behind and costs no event. The check here is after our
 * own fence only: on an engine whose guest stores may still sit in its CPU's store
 * buffer (bt), an rsp_event just set can be missed, so "not asked" is not settled
 * until settle_responses, once a pass, after the barrier that holds against the
 * guest's (vcpu.c's hv_guest_barrier: a membarrier on bt, costly once per response). */
static void push_responses(struct blkback *b)
{
    volatile struct blkif_sring_header *s = sring(b);
    if (b->rsp_pushed == b->rsp_prod)
        return;
    __atomic_store_n(&s->rsp_prod, b->rsp_prod, __ATOMIC_RELEASE);
    b->rsp_pushed = b->rsp_prod;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (response_wanted(b, b->rsp_settled))
        notify_frontend(b);
}

/* After hv_guest_barrier: every rsp_event the guest set before it is seen, so any
 * response not yet settled that it asked for gets its event now. A frontend sleeping
 * on one is woken at the latest here, before this thread looks for more work or
 * sleeps itself. */
static void settle_responses(struct blkback *b)
{
    if (b->rsp_settled != b->rsp_prod && response_wanted(b, b->rsp_settled))
        notify_frontend(b);
    b->rsp_settled = b->rsp_prod;
}

/* Take every request on the ring, answer each as it is done (the frontend can refill
 * the ring meanwhile), notify as io/ring.h says. */
static void serve(struct blkback *b)
{
    volatile struct blkif_sring_header *s = sring(b);
    int more;
    if (__atomic_load_n(&s->req_prod, __ATOMIC_ACQUIRE) == b->req_cons)
        return;                         /* woken for nothing new: req_event stands */
    count(b, &b->stats.wakeups, 1);
    do {
        uint32_t prod = __atomic_load_n(&s->req_prod, __ATOMIC_ACQUIRE);
        if (prod - b->req_cons > b->nr_ents) {
            /* no honest frontend is more than a ring ahead: stop serving it */
            fprintf(stderr, "trapless: blkback d%u/%u: req_prod %u is more than a ring ahead "
                    "of %u; ring no longer served\n", b->domid, b->devid, prod, b->req_cons);
            count(b, &b->stats.ring_broken, 1);
            set_state(b, XenbusStateClosing);
            return;
        }
        while (b->req_cons != prod && !b->stopping) {
            struct blkif_request r;
            struct blkif_response rsp = { 0 };
            ring_copy(b, slot(b, b->req_cons), &r, sizeof(r), 0);
            b->req_cons++;
            rsp.id = r.id;
            rsp.operation = response_operation(&r);
            rsp.status = do_request(b, &r);
            ring_copy(b, slot(b, b->rsp_prod), &rsp, sizeof(rsp), 1);
            b->rsp_prod++;
            count(b, rsp.status == BLKIF_RSP_OKAY ? &b->stats.requests : &b->stats.errors, 1);
            push_responses(b);
        }
        if (b->stopping)
            return;
        /* ask to be notified of the next request, then look once more, after the
         * barrier that holds against the guest's own (vcpu.c, hv_guest_barrier); the
         * same barrier settles the responses of this pass */
        s->req_event = b->req_cons + 1;
        hv_guest_barrier(b->d);
        settle_responses(b);
        more = __atomic_load_n(&s->req_prod, __ATOMIC_ACQUIRE) != b->req_cons;
    } while (more);
}

/* ---- the handshake ---- */

static void disconnect(struct blkback *b)
{
    if (b->port) {
        hv_evtchn_unbind_backend(b->d, b->port);
        b->port = 0;
    }
    release_all(b->ring, b->ring_pages);
    b->ring_pages = b->nr_ents = 0;
}

/* The frontend published its ring: map it, bind its port, publish the disk. */
static int connect(struct blkback *b)
{
    char proto[32];
    int64_t order = hv_bk_read_num(b->front, "ring-page-order", RING_PAGE_ORDER_MAX + 1);
    int64_t port = hv_bk_read_num(b->front, "event-channel", UINT32_MAX);
    uint32_t pages = order < 0 ? 1 : 1u << order, slots;

    if (port <= 0)
        return -1;
    if (hv_bk_read(b->front, "protocol", proto, sizeof(proto)) == 0 && strcmp(proto, "x86_64-abi"))
        return -1;                      /* only the native layout */
    for (uint32_t i = 0; i < pages; i++) {
        char key[24];
        int64_t ref;
        if (order < 0)
            snprintf(key, sizeof(key), "ring-ref");
        else
            snprintf(key, sizeof(key), "ring-ref%u", i);
        ref = hv_bk_read_num(b->front, key, UINT32_MAX);
        if (ref < 0 || hv_grant_acquire(b->domid, (uint32_t)ref, 0, HV_GRANT_WRITE,
                                        &b->ring[i]) != GNTST_okay) {
            release_all(b->ring, i);
            return -1;
        }
    }
    b->ring_pages = pages;
    slots = (pages * HV_PAGE_SIZE - BLKIF_RING_HEADER) / sizeof(struct blkif_request);
    for (b->nr_ents = 1; b->nr_ents * 2 <= slots; b->nr_ents *= 2)
        ;
    /* the indexes start where the frontend left them (it zeroes them on setup) */
    b->req_cons = b->rsp_prod = b->rsp_pushed = b->rsp_settled = __atomic_load_n(&sring(b)->rsp_prod,
                                                                __ATOMIC_ACQUIRE);
    if (hv_evtchn_bind_backend_port(b->d, (uint32_t)port, wake, b) < 0) {
        release_all(b->ring, pages);
        b->ring_pages = 0;
        return -1;
    }
    b->port = (uint32_t)port;
    hv_bk_printf(b->back, "sectors", "%llu", (unsigned long long)b->sectors);
    hv_bk_printf(b->back, "sector-size", "%u", BLKIF_SECTOR_SIZE);
    hv_bk_printf(b->back, "physical-sector-size", "%u", BLKIF_SECTOR_SIZE);
    hv_bk_printf(b->back, "info", "%u", b->readonly ? VDISK_READONLY : 0);
    set_state(b, XenbusStateConnected);
    return 0;
}

/* Follow the frontend's state, as blkback's frontend_changed does. */
static void step(struct blkback *b)
{
    int64_t fs = hv_bk_read_num(b->front, "state", 16);
    switch (fs) {
    case XenbusStateInitialised:
    case XenbusStateConnected:
        if (b->state == XenbusStateConnected || b->state == XenbusStateClosing)
            break;
        if (connect(b) < 0) {
            fprintf(stderr, "trapless: blkback d%u/%u: the frontend's ring-ref, event-channel "
                    "or protocol is not usable\n", b->domid, b->devid);
            set_state(b, XenbusStateClosing);
        }
        break;
    case XenbusStateClosing:
        disconnect(b);
        if (b->state != XenbusStateClosing)
            set_state(b, XenbusStateClosing);
        break;
    case XenbusStateClosed:
        disconnect(b);
        if (b->state != XenbusStateClosed)
            set_state(b, XenbusStateClosed);
        break;
    case XenbusStateInitialising:
        if (b->state == XenbusStateClosed)  /* the frontend starts over */
            set_state(b, XenbusStateInitWait);
        break;
    default:
        break;
    }
}

static void *run(void *arg)
{
    struct blkback *b = arg;
    uint64_t n;
    prctl(PR_SET_NAME, "blkback");      /* what top, perf and /proc/PID/task call it */
    step(b);
    while (!b->stopping) {
        if (read(b->wake_fd, &n, sizeof(n)) < 0 && errno != EINTR)
            break;
        if (b->stopping)
            break;
        step(b);
        if (b->state == XenbusStateConnected)
            serve(b);
    }
    return NULL;
}

/* ---- attach and detach ---- */

int hv_blkback_attach(struct hv_domain *d, uint32_t devid, int fd, int readonly, char *err,
                      int err_len)
{
    struct blkback *b;
    struct stat st;
    char watch[HV_BK_PATH_BYTES + 8];

    if (fstat(fd, &st) < 0 || !S_ISREG(st.st_mode)) {
        snprintf(err, (size_t)err_len, "the disk image is not a regular file");
        close(fd);
        return -1;
    }
    if (!(b = calloc(1, sizeof(*b)))) {
        snprintf(err, (size_t)err_len, "out of memory");
        close(fd);
        return -1;
    }
    b->d = d;
    b->domid = (uint16_t)d->domid;
    b->devid = devid;
    b->fd = fd;
    b->readonly = readonly;
    b->sectors = (uint64_t)st.st_size / BLKIF_SECTOR_SIZE;
    pthread_mutex_init(&b->stats_lock, NULL);
    snprintf(b->front, sizeof(b->front), "/local/domain/%u/device/vbd/%u", b->domid, devid);
    snprintf(b->back, sizeof(b->back), "/local/domain/0/backend/vbd/%u/%u", b->domid, devid);
    if ((b->wake_fd = eventfd(0, EFD_CLOEXEC)) < 0) {
        snprintf(err, (size_t)err_len, "eventfd: %s", strerror(errno));
        close(fd);
        free(b);
        return -1;
    }
    /* what we offer, then InitWait: the frontend may set up its ring now */
    hv_bk_printf(b->back, "feature-flush-cache", "1");
    hv_bk_printf(b->back, "feature-barrier", "1");
    hv_bk_printf(b->back, "feature-discard", "%d", !readonly);
    hv_bk_printf(b->back, "discard-granularity", "%u", BLKIF_SECTOR_SIZE);
    hv_bk_printf(b->back, "feature-max-indirect-segments", "%u", INDIRECT_SEGS_MAX);
    hv_bk_printf(b->back, "max-ring-page-order", "%u", RING_PAGE_ORDER_MAX);
    set_state(b, XenbusStateInitWait);
    snprintf(watch, sizeof(watch), "%s/state", b->front);
    if (hv_xs_host_watch(watch, wake, b) < 0 ||
        pthread_create(&b->thread, NULL, run, b) != 0) {
        hv_xs_host_unwatch(b);
        snprintf(err, (size_t)err_len, "cannot start the backend's thread");
        close(b->wake_fd);
        close(fd);
        free(b);
        return -1;
    }
    pthread_mutex_lock(&devices_lock);
    b->next = devices;
    devices = b;
    pthread_mutex_unlock(&devices_lock);
    return 0;
}

static void detach(struct blkback *b)
{
    hv_xs_host_unwatch(b);
    b->stopping = 1;
    wake(b);
    pthread_join(b->thread, NULL);      /* it finishes the request it is doing */
    disconnect(b);
    fsync(b->fd);                       /* everything acknowledged is on the disk */
    close(b->fd);
    close(b->wake_fd);
    pthread_mutex_destroy(&b->stats_lock);
    free(b);
}

void hv_blkback_detach_all(struct hv_domain *d)
{
    struct blkback *gone = NULL;
    pthread_mutex_lock(&devices_lock);
    for (struct blkback **p = &devices; *p; ) {
        struct blkback *b = *p;
        if (b->d == d) {
            *p = b->next;
            b->next = gone;
            gone = b;
        } else {
            p = &b->next;
        }
    }
    pthread_mutex_unlock(&devices_lock);
    while (gone) {
        struct blkback *next = gone->next;
        detach(gone);
        gone = next;
    }
}

int hv_blkback_stats(uint32_t domid, uint32_t devid, struct hv_blkback_stats *out)
{
    int found = 0;
    pthread_mutex_lock(&devices_lock);
    for (struct blkback *b = devices; b; b = b->next)
        if (b->domid == domid && b->devid == devid) {
            pthread_mutex_lock(&b->stats_lock);
            *out = b->stats;
            pthread_mutex_unlock(&b->stats_lock);
            out->state = (uint32_t)b->state;
            found = 1;
        }
    pthread_mutex_unlock(&devices_lock);
    return found ? 0 : -XEN_ENOENT;
}
