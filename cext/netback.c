/*
 * netback.c - the network backend: trapless's end of a domain's virtual network cards,
 * and the software bridges that connect them.
 *
 * Xen gives a domU a network card as a split device (io/netif.h): the frontend puts the
 * frames it sends on a tx ring (each a chain of requests naming granted pages) and
 * empty granted pages on an rx ring; the backend copies the frames out of the tx pages
 * into dom0's network, copies frames for the guest into the rx pages (rx-copy mode, the
 * one Linux's netfront asks for) and answers on both rings. In Xen, dom0's network is
 * a Linux bridge that the vif script plugs vifN.M into; here it is a bridge inside this
 * process, found by the name xl's `bridge=` gives: a learning switch on MAC addresses
 * that floods broadcasts and unknown destinations. There is no host networking.
 *
 * Each vif has a thread of its own that sleeps on an eventfd, woken by the frontend's
 * notifications, by changes to its xenstore state and by frames the bridge queues for
 * it; the vCPU thread never moves a frame and no Python runs on the data path. A port's
 * queue is bounded: a frame for a port whose guest posts no rx buffers is dropped, not
 * kept. A destroyed domain's ports leave their bridges; the others go on.
 *
 * The guest writes the rings, so: indexes are read once and a producer more than a
 * ring ahead stops the device being served; each request is copied out of the ring
 * before it is looked at; every piece of a frame is checked (inside its page, no more
 * than the frame's size) and moved with hv_grant_copy, which checks the grant.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <sys/prctl.h>
#include <unistd.h>

#include "hv.h"
#include "backend.h"

#define PORT_QUEUE      128             /* frames waiting for a port's rx buffers */
#define MAC_TABLE       256             /* addresses a bridge remembers */
#define TX_SLOTS_MAX    18              /* Linux netback's XEN_NETBK_LEGACY_SLOTS_MAX */
#define TX_EXTRAS_MAX   4               /* extra-info slots after one request */
#define ETH_ALEN        6
#define ETH_HLEN        14

struct frame {
    uint32_t len;
    uint16_t rx_flags;                  /* NETRXF_* the receiver is told */
    uint8_t  data[];
};

struct bridge;

struct netback {
    struct netback *next;               /* every device, under devices_lock */
    struct netback *port_next;          /* the bridge's ports, under bridges_lock */
    struct bridge *bridge;
    struct hv_domain *d;
    uint16_t domid;
    uint32_t devid;
    uint8_t mac[ETH_ALEN];              /* the guest's (libxl's mac=); the bridge learns it */
    char front[HV_BK_PATH_BYTES], back[HV_BK_PATH_BYTES];
    int wake_fd;
    pthread_t thread;
    volatile int stopping;

    /* the connection (the thread's own; connected is read by senders too) */
    int state;                          /* ours: XenbusState* */
    volatile int connected;
    int sg;                             /* the frontend takes a frame in several rx pages */
    uint32_t port;
    struct hv_grant_use tx_ring, rx_ring;
    uint32_t tx_cons, tx_rsp;           /* tx: requests taken, responses made */
    uint32_t rx_cons, rx_rsp;

    /* frames for the guest, from the bridge */
    pthread_mutex_t queue_lock;
    struct frame *queue[PORT_QUEUE];
    uint32_t queue_head, queue_len;

    pthread_mutex_t stats_lock;
    struct hv_netback_stats stats;
};

struct bridge {
    struct bridge *next;
    char name[HV_NETBACK_BRIDGE_NAME];
    struct netback *ports;
    struct { uint8_t mac[ETH_ALEN]; struct netback *port; } macs[MAC_TABLE];
    uint32_t macs_used, macs_next;      /* full: the oldest entry is replaced */
};

static pthread_mutex_t devices_lock = PTHREAD_MUTEX_INITIALIZER;
static struct netback *devices;
/* Bridges, their ports and address tables; a port's queue_lock nests inside. */
static pthread_mutex_t bridges_lock = PTHREAD_MUTEX_INITIALIZER;
static struct bridge *bridges;

static void wake(void *arg)
{
    struct netback *nb = arg;
    uint64_t one = 1;
    if (write(nb->wake_fd, &one, sizeof(one)) < 0) {
        /* the counter is full: the thread is awake already */
    }
}

static void count(struct netback *nb, uint64_t *field, uint64_t n)
{
    pthread_mutex_lock(&nb->stats_lock);
    *field += n;
    pthread_mutex_unlock(&nb->stats_lock);
}

static void set_state(struct netback *nb, int state)
{
    nb->state = state;
    hv_bk_printf(nb->back, "state", "%d", state);
}

/* ---- the bridge ---- */

static int is_multicast(const uint8_t *mac)
{
    return mac[0] & 1;                  /* broadcast is one too */
}

/* Caller holds bridges_lock. */
static void learn(struct bridge *br, const uint8_t *mac, struct netback *port)
{
    uint32_t i;
    if (is_multicast(mac))
        return;
    for (i = 0; i < br->macs_used; i++)
        if (!memcmp(br->macs[i].mac, mac, ETH_ALEN)) {
            br->macs[i].port = port;    /* it moved, or it is where it was */
            return;
        }
    if (br->macs_used < MAC_TABLE) {
        i = br->macs_used++;
    } else {
        i = br->macs_next;
        br->macs_next = (br->macs_next + 1) % MAC_TABLE;
    }
    memcpy(br->macs[i].mac, mac, ETH_ALEN);
    br->macs[i].port = port;
}

static struct netback *lookup(struct bridge *br, const uint8_t *mac)
{
    for (uint32_t i = 0; i < br->macs_used; i++)
        if (!memcmp(br->macs[i].mac, mac, ETH_ALEN))
            return br->macs[i].port;
    return NULL;
}

/* Queue f for port's guest (the queue owns f from here); dropped if the port is not
 * connected or its queue is full. Caller holds bridges_lock. */
static void enqueue(struct netback *port, struct frame *f)
{
    int queued = 0;
    pthread_mutex_lock(&port->queue_lock);
    if (port->connected && port->queue_len < PORT_QUEUE) {
        port->queue[(port->queue_head + port->queue_len++) % PORT_QUEUE] = f;
        queued = 1;
    }
    pthread_mutex_unlock(&port->queue_lock);
    if (queued) {
        wake(port);
    } else {
        free(f);
        count(port, &port->stats.rx_dropped, 1);
    }
}

static struct frame *frame_copy(const struct frame *f)
{
    struct frame *c = malloc(sizeof(*c) + f->len);
    if (c)
        memcpy(c, f, sizeof(*c) + f->len);
    return c;
}

/* A frame the guest behind `from` sent: to the port its destination was learned on, or
 * (broadcast, multicast, unknown) to every other port. */
static void forward(struct netback *from, struct frame *f)
{
    struct bridge *br = from->bridge;
    struct netback *to;

    pthread_mutex_lock(&bridges_lock);
    learn(br, f->data + ETH_ALEN, from);
    to = is_multicast(f->data) ? NULL : lookup(br, f->data);
    if (to) {
        if (to != from)
            enqueue(to, f);
        else
            free(f);                    /* a switch does not send a frame back */
        f = NULL;
    } else {
        for (to = br->ports; to; to = to->port_next) {
            struct frame *c;
            if (to == from)
                continue;
            if ((c = frame_copy(f)))
                enqueue(to, c);
            else
                count(to, &to->stats.rx_dropped, 1);
        }
    }
    pthread_mutex_unlock(&bridges_lock);
    free(f);
}

/* Plug nb into the bridge called name (made on first use). */
static int bridge_join(struct netback *nb, const char *name)
{
    struct bridge *br;
    pthread_mutex_lock(&bridges_lock);
    for (br = bridges; br && strcmp(br->name, name); br = br->next)
        ;
    if (!br) {
        if (!(br = calloc(1, sizeof(*br)))) {
            pthread_mutex_unlock(&bridges_lock);
            return -1;
        }
        snprintf(br->name, sizeof(br->name), "%s", name);
        br->next = bridges;
        bridges = br;
    }
    nb->bridge = br;
    nb->port_next = br->ports;
    br->ports = nb;
    pthread_mutex_unlock(&bridges_lock);
    return 0;
}

/* Unplug nb: nobody queues for it after this; a bridge with no ports goes. */
static void bridge_leave(struct netback *nb)
{
    struct bridge *br = nb->bridge;
    if (!br)
        return;
    pthread_mutex_lock(&bridges_lock);
    for (struct netback **p = &br->ports; *p; p = &(*p)->port_next)
        if (*p == nb) {
            *p = nb->port_next;
            break;
        }
    for (uint32_t i = 0; i < br->macs_used; ) {
        if (br->macs[i].port == nb) {   /* forget its addresses: they flood again */
            br->macs[i] = br->macs[--br->macs_used];
            br->macs_next = 0;
        } else {
            i++;
        }
    }
    if (!br->ports) {
        for (struct bridge **p = &bridges; *p; p = &(*p)->next)
            if (*p == br) {
                *p = br->next;
                break;
            }
        free(br);
    }
    pthread_mutex_unlock(&bridges_lock);
    nb->bridge = NULL;
}

/* ---- the rings ---- */

static volatile struct blkif_sring_header *header(struct hv_grant_use *ring)
{
    return (volatile struct blkif_sring_header *)ring->page;   /* the same 64 bytes */
}

static void *entry(struct hv_grant_use *ring, uint32_t idx, uint32_t size, uint32_t slots)
{
    return ring->page + NET_RING_HEADER + (size_t)(idx & (slots - 1)) * size;
}

/* Publish rsp (io/ring.h's push): 1 if the frontend asked to be told. Before we
 * conclude it did not, the barrier that holds against the guest's own (vcpu.c,
 * hv_guest_barrier). */
static int push(struct netback *nb, struct hv_grant_use *ring, uint32_t rsp, uint32_t old)
{
    volatile struct blkif_sring_header *s = header(ring);
    if (rsp == old)
        return 0;                       /* nothing new to publish */
    __atomic_store_n(&s->rsp_prod, rsp, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (rsp - s->rsp_event < rsp - old)
        return 1;
    hv_guest_barrier(nb->d);
    return rsp - s->rsp_event < rsp - old;
}

static void ring_broken(struct netback *nb, const char *which, uint32_t prod, uint32_t cons)
{
    fprintf(stderr, "trapless: netback d%u/%u: %s req_prod %u is more than a ring ahead "
            "of %u; device no longer served\n", nb->domid, nb->devid, which, prod, cons);
    count(nb, &nb->stats.ring_broken, 1);
    nb->connected = 0;
    set_state(nb, XenbusStateClosing);
}

static void tx_respond(struct netback *nb, uint16_t id, int16_t status)
{
    struct netif_tx_response r = { .id = id, .status = status };
    /* a response takes a whole slot of the request/response union: 12 bytes */
    memcpy(entry(&nb->tx_ring, nb->tx_rsp++, sizeof(struct netif_tx_request),
                 NET_TX_RING_SIZE), &r, sizeof(r));
}

/* One frame from the tx ring, starting at tx_cons; prod: the producer read. Returns 0
 * when the frame was answered, -1 when it is not all on the ring yet. */
static int tx_frame(struct netback *nb, uint32_t prod)
{
    struct netif_tx_request req[TX_SLOTS_MAX];
    uint32_t idx = nb->tx_cons, n = 0, extras = 0, more, rest = 0;
    int16_t status = NETIF_RSP_OKAY;
    struct frame *f = NULL;

#define TAKE(dst) do { if (idx == prod) return -1; \
        memcpy((dst), entry(&nb->tx_ring, idx++, sizeof(struct netif_tx_request), \
                            NET_TX_RING_SIZE), sizeof(*(dst))); } while (0)
    TAKE(&req[0]);
    n = 1;
    if (req[0].flags & NETTXF_extra_info) {
        struct netif_extra_info x;
        do {
            TAKE(&x);
            extras++;
        } while ((x.flags & XEN_NETIF_EXTRA_FLAG_MORE) && extras <= TX_EXTRAS_MAX);
        if (extras > TX_EXTRAS_MAX)
            status = NETIF_RSP_ERROR;
    }
    more = req[0].flags & NETTXF_more_data;
    while (more) {
        struct netif_tx_request r;
        TAKE(&r);
        if (n < TX_SLOTS_MAX)
            req[n] = r;
        else
            status = NETIF_RSP_ERROR;   /* more pieces than any frontend sends */
        n++;
        more = r.flags & NETTXF_more_data;
    }
#undef TAKE
    nb->tx_cons = idx;

    /* the pieces: each inside its page; together exactly the first request's size */
    if (status == NETIF_RSP_OKAY) {
        uint32_t total = req[0].size, sum = 0;
        for (uint32_t i = 0; i < n; i++) {
            uint32_t len = i ? req[i].size : 0;
            sum += len;
        }
        if (total < ETH_HLEN || sum > total)
            status = NETIF_RSP_ERROR;
        rest = total - sum;             /* what the first piece carries */
        for (uint32_t i = 0; i < n && status == NETIF_RSP_OKAY; i++) {
            uint32_t len = i ? req[i].size : rest;
            if ((uint32_t)req[i].offset + len > HV_PAGE_SIZE)
                status = NETIF_RSP_ERROR;
        }
        if (status == NETIF_RSP_OKAY && !(f = malloc(sizeof(*f) + total)))
            status = NETIF_RSP_DROPPED;
        if (f) {
            uint32_t at = 0;
            f->len = total;
            f->rx_flags = (req[0].flags & NETTXF_csum_blank) ?
                          NETRXF_csum_blank | NETRXF_data_validated :
                          (req[0].flags & NETTXF_data_validated) ? NETRXF_data_validated : 0;
            for (uint32_t i = 0; i < n && status == NETIF_RSP_OKAY; i++) {
                uint32_t len = i ? req[i].size : rest;
                if (len && hv_grant_copy(nb->domid, req[i].gref, 0, HV_GRANT_READ,
                                         req[i].offset, f->data + at, len) != GNTST_okay) {
                    status = NETIF_RSP_ERROR;
                    count(nb, &nb->stats.bad_grants, 1);
                }
                at += len;
            }
        }
    }

    /* one response a slot, in the order of the slots: extras answer NETIF_RSP_NULL */
    tx_respond(nb, req[0].id, status);
    for (uint32_t i = 0; i < extras; i++)
        tx_respond(nb, 0, NETIF_RSP_NULL);
    for (uint32_t i = 1; i < n; i++)
        tx_respond(nb, i < TX_SLOTS_MAX ? req[i].id : 0, status);
    if (status == NETIF_RSP_OKAY) {
        count(nb, &nb->stats.tx_frames, 1);
        count(nb, &nb->stats.tx_bytes, f->len);
        forward(nb, f);
    } else {
        free(f);
        count(nb, &nb->stats.tx_errors, 1);
    }
    return 0;
}

/* Every frame on the tx ring to the bridge. 1: the frontend is to be notified. */
static int serve_tx(struct netback *nb)
{
    volatile struct blkif_sring_header *s = header(&nb->tx_ring);
    int notify = 0, more;
    do {
        uint32_t prod = __atomic_load_n(&s->req_prod, __ATOMIC_ACQUIRE), old = nb->tx_rsp;
        if (prod - nb->tx_cons > NET_TX_RING_SIZE) {
            ring_broken(nb, "tx", prod, nb->tx_cons);
            return notify;
        }
        while (nb->tx_cons != prod && !nb->stopping && tx_frame(nb, prod) == 0)
            ;
        notify |= push(nb, &nb->tx_ring, nb->tx_rsp, old);
        if (nb->stopping)
            return notify;
        /* told of the next request (a frame cut short: of its next piece), look again */
        s->req_event = nb->tx_cons + 1;
        hv_guest_barrier(nb->d);
        more = __atomic_load_n(&s->req_prod, __ATOMIC_ACQUIRE) != prod;
    } while (more);
    return notify;
}

/* Queued frames into the guest's posted rx pages. 1: the frontend is to be notified. */
static int serve_rx(struct netback *nb)
{
    volatile struct blkif_sring_header *s = header(&nb->rx_ring);
    uint32_t old = nb->rx_rsp;

    for (;;) {
        struct frame *f;
        uint32_t prod, pages;
        pthread_mutex_lock(&nb->queue_lock);
        f = nb->queue_len ? nb->queue[nb->queue_head] : NULL;
        pthread_mutex_unlock(&nb->queue_lock);
        if (!f || nb->stopping)
            break;
        pages = (f->len + HV_PAGE_SIZE - 1) / HV_PAGE_SIZE;
        prod = __atomic_load_n(&s->req_prod, __ATOMIC_ACQUIRE);
        if (prod - nb->rx_cons > NET_RX_RING_SIZE) {
            ring_broken(nb, "rx", prod, nb->rx_cons);
            break;
        }
        if (pages > 1 && !nb->sg) {
            count(nb, &nb->stats.rx_dropped, 1);   /* it cannot take a frame this big */
        } else if (prod - nb->rx_cons < pages) {
            /* too few buffers: be told when it posts more, then look again */
            s->req_event = nb->rx_cons + pages;
            hv_guest_barrier(nb->d);
            if (__atomic_load_n(&s->req_prod, __ATOMIC_ACQUIRE) - nb->rx_cons < pages)
                break;
            continue;
        } else {
            int16_t bad = 0;
            for (uint32_t i = 0, at = 0; i < pages; i++) {
                struct netif_rx_request req;
                struct netif_rx_response rsp = { 0 };
                uint32_t len = f->len - at < HV_PAGE_SIZE ? f->len - at : HV_PAGE_SIZE;
                memcpy(&req, entry(&nb->rx_ring, nb->rx_cons++, sizeof(req), NET_RX_RING_SIZE),
                       sizeof(req));
                if (!bad && hv_grant_copy(nb->domid, req.gref, 0, HV_GRANT_WRITE, 0,
                                          f->data + at, len) != GNTST_okay) {
                    bad = NETIF_RSP_ERROR;
                    count(nb, &nb->stats.bad_grants, 1);
                }
                rsp.id = req.id;
                rsp.offset = 0;
                rsp.flags = (uint16_t)((i ? 0 : f->rx_flags) | (i + 1 < pages ? NETRXF_more_data : 0));
                rsp.status = bad ? bad : (int16_t)len;
                memcpy(entry(&nb->rx_ring, nb->rx_rsp++, sizeof(rsp), NET_RX_RING_SIZE), &rsp,
                       sizeof(rsp));
                at += len;
            }
            if (bad) {
                count(nb, &nb->stats.rx_dropped, 1);
            } else {
                count(nb, &nb->stats.rx_frames, 1);
                count(nb, &nb->stats.rx_bytes, f->len);
            }
        }
        pthread_mutex_lock(&nb->queue_lock);
        nb->queue_head = (nb->queue_head + 1) % PORT_QUEUE;
        nb->queue_len--;
        pthread_mutex_unlock(&nb->queue_lock);
        free(f);
    }
    return push(nb, &nb->rx_ring, nb->rx_rsp, old);
}

/* ---- the handshake ---- */

static void drop_queue(struct netback *nb)
{
    pthread_mutex_lock(&nb->queue_lock);
    while (nb->queue_len) {
        free(nb->queue[nb->queue_head]);
        nb->queue_head = (nb->queue_head + 1) % PORT_QUEUE;
        nb->queue_len--;
    }
    pthread_mutex_unlock(&nb->queue_lock);
}

static void disconnect(struct netback *nb)
{
    nb->connected = 0;
    if (nb->port) {
        hv_evtchn_unbind_backend(nb->d, nb->port);
        nb->port = 0;
    }
    if (nb->tx_ring.page)
        hv_grant_release(&nb->tx_ring);
    if (nb->rx_ring.page)
        hv_grant_release(&nb->rx_ring);
    drop_queue(nb);
}

/* The frontend published its rings: map them and bind its port (one queue, one event
 * channel, rx-copy: what we offer). */
static int connect(struct netback *nb)
{
    int64_t tx = hv_bk_read_num(nb->front, "tx-ring-ref", UINT32_MAX);
    int64_t rx = hv_bk_read_num(nb->front, "rx-ring-ref", UINT32_MAX);
    int64_t port = hv_bk_read_num(nb->front, "event-channel", UINT32_MAX);
    int64_t copy = hv_bk_read_num(nb->front, "request-rx-copy", 2);
    int64_t sg = hv_bk_read_num(nb->front, "feature-sg", 2);

    if (tx < 0 || rx < 0 || port <= 0 || copy != 1)
        return -1;
    if (hv_grant_acquire(nb->domid, (uint32_t)tx, 0, HV_GRANT_WRITE, &nb->tx_ring) != GNTST_okay)
        return -1;
    if (hv_grant_acquire(nb->domid, (uint32_t)rx, 0, HV_GRANT_WRITE, &nb->rx_ring) != GNTST_okay) {
        hv_grant_release(&nb->tx_ring);
        return -1;
    }
    /* the indexes start where the frontend left them (it zeroes them on setup) */
    nb->tx_cons = nb->tx_rsp = __atomic_load_n(&header(&nb->tx_ring)->rsp_prod, __ATOMIC_ACQUIRE);
    nb->rx_cons = nb->rx_rsp = __atomic_load_n(&header(&nb->rx_ring)->rsp_prod, __ATOMIC_ACQUIRE);
    if (hv_evtchn_bind_backend_port(nb->d, (uint32_t)port, wake, nb) < 0) {
        hv_grant_release(&nb->tx_ring);
        hv_grant_release(&nb->rx_ring);
        return -1;
    }
    nb->port = (uint32_t)port;
    nb->sg = sg == 1;
    nb->connected = 1;
    set_state(nb, XenbusStateConnected);
    return 0;
}

/* Follow the frontend's state, as netback's frontend_changed does. */
static void step(struct netback *nb)
{
    int64_t fs = hv_bk_read_num(nb->front, "state", 16);
    switch (fs) {
    case XenbusStateInitialised:
    case XenbusStateConnected:
        if (nb->state == XenbusStateConnected || nb->state == XenbusStateClosing)
            break;
        if (connect(nb) < 0) {
            fprintf(stderr, "trapless: netback d%u/%u: the frontend's tx-ring-ref, "
                    "rx-ring-ref, event-channel or request-rx-copy is not usable\n",
                    nb->domid, nb->devid);
            set_state(nb, XenbusStateClosing);
        }
        break;
    case XenbusStateClosing:
        disconnect(nb);
        if (nb->state != XenbusStateClosing)
            set_state(nb, XenbusStateClosing);
        break;
    case XenbusStateClosed:
        disconnect(nb);
        if (nb->state != XenbusStateClosed)
            set_state(nb, XenbusStateClosed);
        break;
    case XenbusStateInitialising:
        if (nb->state == XenbusStateClosed)  /* the frontend starts over */
            set_state(nb, XenbusStateInitWait);
        break;
    default:
        break;
    }
}

static void *run(void *arg)
{
    struct netback *nb = arg;
    uint64_t n;
    prctl(PR_SET_NAME, "netback");      /* what top, perf and /proc/PID/task call it */
    step(nb);
    while (!nb->stopping) {
        if (read(nb->wake_fd, &n, sizeof(n)) < 0 && errno != EINTR)
            break;
        if (nb->stopping)
            break;
        step(nb);
        if (nb->connected) {
            int notify = serve_tx(nb);
            if (nb->connected)
                notify |= serve_rx(nb);
            if (notify)
                hv_evtchn_backend_notify(nb->d, nb->port);
        }
    }
    return NULL;
}

/* ---- attach and detach ---- */

int hv_netback_attach(struct hv_domain *d, uint32_t devid, const uint8_t *mac,
                      const char *bridge, char *err, int err_len)
{
    struct netback *nb;
    char watch[HV_BK_PATH_BYTES + 8];

    if (!bridge[0] || strlen(bridge) >= HV_NETBACK_BRIDGE_NAME) {
        snprintf(err, (size_t)err_len, "a bridge's name has 1 to %d characters",
                 HV_NETBACK_BRIDGE_NAME - 1);
        return -1;
    }
    if (!(nb = calloc(1, sizeof(*nb)))) {
        snprintf(err, (size_t)err_len, "out of memory");
        return -1;
    }
    nb->d = d;
    nb->domid = (uint16_t)d->domid;
    nb->devid = devid;
    memcpy(nb->mac, mac, ETH_ALEN);
    pthread_mutex_init(&nb->queue_lock, NULL);
    pthread_mutex_init(&nb->stats_lock, NULL);
    snprintf(nb->front, sizeof(nb->front), "/local/domain/%u/device/vif/%u", nb->domid, devid);
    snprintf(nb->back, sizeof(nb->back), "/local/domain/0/backend/vif/%u/%u", nb->domid, devid);
    if ((nb->wake_fd = eventfd(0, EFD_CLOEXEC)) < 0) {
        snprintf(err, (size_t)err_len, "eventfd: %s", strerror(errno));
        free(nb);
        return -1;
    }
    /* what we offer (one queue, rx-copy, frames in several pages), then InitWait */
    hv_bk_printf(nb->back, "feature-rx-copy", "1");
    hv_bk_printf(nb->back, "feature-rx-flip", "0");
    hv_bk_printf(nb->back, "feature-sg", "1");
    set_state(nb, XenbusStateInitWait);
    snprintf(watch, sizeof(watch), "%s/state", nb->front);
    if (bridge_join(nb, bridge) < 0 || hv_xs_host_watch(watch, wake, nb) < 0 ||
        pthread_create(&nb->thread, NULL, run, nb) != 0) {
        hv_xs_host_unwatch(nb);
        bridge_leave(nb);
        snprintf(err, (size_t)err_len, "cannot start the backend's thread");
        close(nb->wake_fd);
        free(nb);
        return -1;
    }
    pthread_mutex_lock(&devices_lock);
    nb->next = devices;
    devices = nb;
    pthread_mutex_unlock(&devices_lock);
    return 0;
}

static void detach(struct netback *nb)
{
    hv_xs_host_unwatch(nb);
    bridge_leave(nb);                   /* no frame is queued for it after this */
    nb->stopping = 1;
    wake(nb);
    pthread_join(nb->thread, NULL);
    disconnect(nb);
    close(nb->wake_fd);
    pthread_mutex_destroy(&nb->queue_lock);
    pthread_mutex_destroy(&nb->stats_lock);
    free(nb);
}

void hv_netback_detach_all(struct hv_domain *d)
{
    struct netback *gone = NULL;
    pthread_mutex_lock(&devices_lock);
    for (struct netback **p = &devices; *p; ) {
        struct netback *nb = *p;
        if (nb->d == d) {
            *p = nb->next;
            nb->next = gone;
            gone = nb;
        } else {
            p = &nb->next;
        }
    }
    pthread_mutex_unlock(&devices_lock);
    while (gone) {
        struct netback *next = gone->next;
        detach(gone);
        gone = next;
    }
}

int hv_netback_stats(uint32_t domid, uint32_t devid, struct hv_netback_stats *out)
{
    int found = 0;
    pthread_mutex_lock(&devices_lock);
    for (struct netback *nb = devices; nb; nb = nb->next)
        if (nb->domid == domid && nb->devid == devid) {
            pthread_mutex_lock(&nb->stats_lock);
            *out = nb->stats;
            pthread_mutex_unlock(&nb->stats_lock);
            out->state = (uint32_t)nb->state;
            found = 1;
        }
    pthread_mutex_unlock(&devices_lock);
    return found ? 0 : -XEN_ENOENT;
}
