/*
 * console_ring.c - the PV console backend: trapless's end of a domain's xenconsole ring.
 *
 * Xen's domain builder gives every domU a console page (struct xencons_interface) and an
 * event channel whose other end is xenconsoled in dom0. Here the other end is trapless:
 * when the guest sends on its console port, we take what it produced in the out ring
 * and write it to the domain's console stream (the one console_io writes to); input the
 * toolstack queues goes into the in ring. Either way the guest is notified.
 *
 * The ring lives in guest memory and the guest may write any value into it, so every
 * index is read once, checked, and used only masked: a producer that claims more than
 * the ring holds is ignored (as xenconsoled ignores it), we touch nothing outside the
 * page, and one notification does at most one ring's worth of work. Host-side state is
 * bounded: input the in ring has no room for waits in a fixed buffer, the rest is
 * refused (the toolstack sees how much was taken).
 */
#include <string.h>

#include "hv.h"

#define OUT_MASK (XENCONS_OUT_SIZE - 1)
#define IN_MASK  (XENCONS_IN_SIZE - 1)

/* The ring, if the domain has one and its frame is still the guest's RAM (a ballooned-out
 * frame is not written). Caller holds console_lock. */
static struct xencons_interface *ring_of(struct hv_domain *d)
{
    struct hv_console_ring *r = &d->cons_ring;
    if (!r->attached || !hv_mm_frame_usable(d, r->gpa >> HV_PAGE_SHIFT))
        return NULL;
    return (struct xencons_interface *)(d->ram + r->gpa);
}

/* Move waiting input into the in ring, as far as it has room. Caller holds console_lock.
 * Returns the number of bytes moved. */
static uint32_t push_input(struct hv_domain *d, struct xencons_interface *intf)
{
    struct hv_console_ring *r = &d->cons_ring;
    uint32_t cons = __atomic_load_n(&intf->in_cons, __ATOMIC_ACQUIRE);
    uint32_t prod = __atomic_load_n(&intf->in_prod, __ATOMIC_ACQUIRE);
    uint32_t used = prod - cons, n = 0;

    if (used > XENCONS_IN_SIZE)
        return 0;                       /* the guest broke the indexes: it gets nothing */
    while (n < XENCONS_IN_SIZE - used && r->pending_cons != r->pending_prod) {
        intf->in[(prod + n) & IN_MASK] = (char)r->pending[r->pending_cons++ & (HV_CONSOLE_IN - 1)];
        n++;
    }
    /* The bytes must be visible before the index that publishes them. */
    __atomic_store_n(&intf->in_prod, prod + n, __ATOMIC_RELEASE);
    return n;
}

/* Take what the guest produced in the out ring. Caller holds console_lock.
 * Returns the number of bytes copied into buf (at most XENCONS_OUT_SIZE). */
static uint32_t pull_output(struct xencons_interface *intf, uint8_t *buf)
{
    uint32_t cons = __atomic_load_n(&intf->out_cons, __ATOMIC_ACQUIRE);
    uint32_t prod = __atomic_load_n(&intf->out_prod, __ATOMIC_ACQUIRE);
    uint32_t n = prod - cons;

    if (n == 0 || n > XENCONS_OUT_SIZE)
        return 0;                       /* nothing, or an impossible producer: ignored */
    for (uint32_t i = 0; i < n; i++)
        buf[i] = (uint8_t)intf->out[(cons + i) & OUT_MASK];
    /* Reading the bytes must finish before the guest may reuse their slots. */
    __atomic_store_n(&intf->out_cons, prod, __ATOMIC_RELEASE);
    return n;
}

/* The guest sent on its console port: it produced output, or consumed input (or both). */
static void console_ring_kick(struct hv_domain *d)
{
    uint8_t buf[XENCONS_OUT_SIZE];
    struct xencons_interface *intf;
    uint32_t out = 0, in = 0;

    pthread_mutex_lock(&d->console_lock);
    intf = ring_of(d);
    if (intf) {
        out = pull_output(intf, buf);
        in = push_input(d, intf);
    }
    pthread_mutex_unlock(&d->console_lock);
    /* Written outside the lock: a slow reader must not hold up the toolstack's input. */
    hv_console_emit(d, buf, out);
    if (out || in)
        hv_evtchn_backend_notify(d, d->cons_ring.port);    /* space freed, or data there */
}

int hv_console_ring_input(struct hv_domain *d, const uint8_t *buf, int len)
{
    struct hv_console_ring *r = &d->cons_ring;
    struct xencons_interface *intf;
    int n = 0;
    uint32_t moved = 0;

    pthread_mutex_lock(&d->console_lock);
    if (!r->attached) {
        pthread_mutex_unlock(&d->console_lock);
        return -1;
    }
    while (n < len && r->pending_prod - r->pending_cons < HV_CONSOLE_IN)
        r->pending[r->pending_prod++ & (HV_CONSOLE_IN - 1)] = buf[n++];
    intf = ring_of(d);
    if (intf)
        moved = push_input(d, intf);
    pthread_mutex_unlock(&d->console_lock);
    if (moved)
        hv_evtchn_backend_notify(d, r->port);
    return n;
}

int hv_console_ring_attach(struct hv_domain *d, uint64_t ring_gpa)
{
    struct xencons_interface *intf;
    int port;

    if (ring_gpa % HV_PAGE_SIZE || !hv_gpa_valid(d, ring_gpa, HV_PAGE_SIZE))
        return -XEN_EINVAL;
    if (d->cons_ring.attached)
        return -XEN_EEXIST;
    port = hv_evtchn_bind_backend(d, console_ring_kick);
    if (port < 0)
        return port;
    pthread_mutex_lock(&d->console_lock);
    d->cons_ring.gpa = ring_gpa;
    d->cons_ring.port = (uint32_t)port;
    d->cons_ring.attached = 1;
    intf = (struct xencons_interface *)(d->ram + ring_gpa);
    memset(intf, 0, sizeof(*intf));
    intf->connection = XENCONS_CONNECTED;   /* the backend is there from the start */
    pthread_mutex_unlock(&d->console_lock);
    return port;
}
