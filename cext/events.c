/*
 * events.c - the interrupt service: Xen's 2-level event channels, shared_info and the
 * upcall vector.
 *
 * A port becomes pending by setting its bit in shared_info.evtchn_pending; if it is not
 * masked, the selector bit and evtchn_upcall_pending of the bound vCPU are set and the
 * vCPU is notified: woken if it sleeps in SCHEDOP_block/poll or hlt, kicked out of the
 * guest if it runs. The engine injects the callback vector once the vCPU is
 * interruptible and its upcall mask is clear (hv_upcall_wanted).
 *
 * Locking: d->ev_lock guards the port table. Bits in shared_info are shared with the
 * guest, so they change only with atomic operations. Cross-domain work takes the
 * registry lock first, then ev_locks in domid order.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hv.h"

#define BITS 64

/* ---- the domain registry (for interdomain channels) ---- */

#define HV_MAX_DOMAINS DOMID_FIRST_RESERVED     /* Xen's domid space: 0 .. 0x7FEF */
static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static struct hv_domain *registry[HV_MAX_DOMAINS];

static void registry_add(struct hv_domain *d)
{
    pthread_mutex_lock(&registry_lock);
    if (d->domid < HV_MAX_DOMAINS)
        registry[d->domid] = d;
    pthread_mutex_unlock(&registry_lock);
}

static void registry_remove(struct hv_domain *d)
{
    pthread_mutex_lock(&registry_lock);
    if (d->domid < HV_MAX_DOMAINS && registry[d->domid] == d)
        registry[d->domid] = NULL;
    pthread_mutex_unlock(&registry_lock);
}

/* Caller holds registry_lock. */
struct hv_domain *hv_domain_lookup(uint32_t domid)
{
    return domid < HV_MAX_DOMAINS ? registry[domid] : NULL;
}

/* ---- shared_info and vcpu_info ---- */

static void wallclock_write(struct hv_domain *d)
{
    struct shared_info *s = hv_shared_info(d);
    __atomic_add_fetch(&s->wc_version, 1, __ATOMIC_SEQ_CST);
    s->wc_sec = (uint32_t)(d->boot_wallclock_ns / 1000000000ULL);
    s->wc_sec_hi = (uint32_t)((d->boot_wallclock_ns / 1000000000ULL) >> 32);
    s->wc_nsec = (uint32_t)(d->boot_wallclock_ns % 1000000000ULL);
    __atomic_add_fetch(&s->wc_version, 1, __ATOMIC_SEQ_CST);
}

/* The guest placed shared_info (XENMEM_add_to_physmap): carry the current state over
 * from where it was (the private page, or the old frame) and refresh the clocks. */
void hv_shared_info_placed(struct hv_domain *d, uint64_t old_gpa)
{
    const uint8_t *old = old_gpa == HV_NO_PAGE ? d->shared_info_private : d->ram + old_gpa;
    pthread_mutex_lock(&d->ev_lock);
    memcpy(d->ram + d->shared_info_gpa, old, sizeof(struct shared_info));
    pthread_mutex_unlock(&d->ev_lock);
    wallclock_write(d);
    for (int i = 0; i < HV_MAX_VCPUS; i++)
        if (d->vcpus[i])
            hv_pvclock_update(d->vcpus[i]);
}

int hv_events_init(struct hv_domain *d, uint32_t max_ports, char *err, int err_len)
{
    struct timespec wall;
    uint64_t sys;

    if (max_ports == 0)
        max_ports = HV_DEFAULT_MAX_PORTS;
    if (max_ports > EVTCHN_2L_NR_CHANNELS) {
        hv_set_error(err, err_len, "at most %d event channel ports", EVTCHN_2L_NR_CHANNELS);
        return -1;
    }
    d->max_ports = max_ports;
    d->ports = calloc(max_ports, sizeof(*d->ports));
    d->deferred = calloc((max_ports + BITS - 1) / BITS, sizeof(uint64_t));
    d->shared_info_private = calloc(1, HV_PAGE_SIZE);
    if (!d->ports || !d->shared_info_private || !d->deferred) {
        free(d->ports);
        free(d->deferred);
        free(d->shared_info_private);
        hv_set_error(err, err_len, "out of host memory");
        return -1;
    }
    d->shared_info_gpa = HV_NO_PAGE;
    pthread_mutex_init(&d->ev_lock, NULL);
    /* A vCPU starts with upcalls masked, as Xen starts it. */
    for (int i = 0; i < XEN_LEGACY_MAX_VCPUS; i++)
        hv_shared_info(d)->vcpu_info[i].evtchn_upcall_mask = 1;
    clock_gettime(CLOCK_REALTIME, &wall);
    sys = hv_system_time();
    d->boot_system_time = sys;
    d->boot_wallclock_ns = (uint64_t)wall.tv_sec * 1000000000ULL + (uint64_t)wall.tv_nsec - sys;
    wallclock_write(d);
    registry_add(d);
    return 0;
}

void hv_events_destroy(struct hv_domain *d)
{
    if (!d->ports)
        return;
    registry_remove(d);
    /* Peers bound to us fall back to unbound-from-us, as when a Xen domain dies. */
    pthread_mutex_lock(&registry_lock);
    for (int id = 0; id < HV_MAX_DOMAINS; id++) {
        struct hv_domain *o = registry[id];
        if (!o || !__atomic_load_n(&o->has_interdomain, __ATOMIC_ACQUIRE))
            continue;
        pthread_mutex_lock(&o->ev_lock);
        for (uint32_t p = 1; p < o->max_ports; p++)
            if (o->ports[p].state == EVTCHNSTAT_interdomain && o->ports[p].remote_dom == d->domid &&
                !o->ports[p].backend)
                o->ports[p].state = EVTCHNSTAT_unbound;
        pthread_mutex_unlock(&o->ev_lock);
    }
    pthread_mutex_unlock(&registry_lock);
    free(d->ports);
    free(d->deferred);
    free(d->shared_info_private);
    pthread_mutex_destroy(&d->ev_lock);
    d->ports = NULL;
}

/* ---- raising an event (2-level ABI) ---- */

int hv_upcall_wanted(struct hv_vcpu *v)
{
    struct vcpu_info *vi = hv_vcpu_info(v);
    if (!v->dom->callback_vector || v->upcall_vector)
        return 0;   /* a per-vCPU upcall vector goes through the local APIC (mark_upcall) */
    /* An HVM/PVH guest's callback vector ignores evtchn_upcall_mask, which is PV's
     * interrupt flag (Xen's hvm_vcpu_has_pending_irq): RFLAGS.IF alone gates it. */
    return __atomic_load_n(&vi->evtchn_upcall_pending, __ATOMIC_ACQUIRE) &&
           (v->dom->guest_type == HV_GUEST_PVH ||
            !__atomic_load_n(&vi->evtchn_upcall_mask, __ATOMIC_ACQUIRE));
}

static void mark_upcall(struct hv_vcpu *v, uint32_t port)
{
    struct vcpu_info *vi = hv_vcpu_info(v);
    __atomic_fetch_or(&vi->evtchn_pending_sel, 1ULL << (port / BITS), __ATOMIC_SEQ_CST);
    /* Xen asserts a per-vCPU upcall vector, an edge, as upcall_pending goes 0 -> 1 */
    if (!__atomic_exchange_n(&vi->evtchn_upcall_pending, 1, __ATOMIC_SEQ_CST) && v->upcall_vector)
        hv_lapic_set_irq(v, v->upcall_vector);
    hv_vcpu_notify(v);
}

/* Caller holds d->ev_lock. The 2-level protocol itself: pending bit, then (unless
 * masked) selector bit and upcall_pending, then the vCPU is told. */
static void raise_port(struct hv_domain *d, struct hv_vcpu *v, uint32_t port)
{
    struct shared_info *s = hv_shared_info(d);
    uint64_t bit = 1ULL << (port % BITS);

    if (__atomic_fetch_or(&s->evtchn_pending[port / BITS], bit, __ATOMIC_SEQ_CST) & bit)
        return;                         /* already pending: nothing new to say */
    if (__atomic_load_n(&s->evtchn_mask[port / BITS], __ATOMIC_SEQ_CST) & bit) {
        /* masked: no upcall, it stays pending until unmasked; but a vCPU polling the
         * port wakes, as Xen's evtchn_2l_set_pending checks pollers either way */
        for (int i = 0; i < HV_MAX_VCPUS; i++)
            if (d->vcpus[i])
                hv_vcpu_wake_poller(d->vcpus[i]);
        return;
    }
    if (v)
        mark_upcall(v, port);
}

/* The protocol only works if the guest's locked instructions (xchg of the selector,
 * lock btr of a pending bit) are atomic against ours. On hardware they are; Unicorn's
 * TCG runs a guest without parallel-safe atomics, so there a locked instruction is a
 * plain load and store, and a bit we set from another thread in between is lost (an
 * event whose selector bit vanished is never scanned again: the port stays pending,
 * every later event on it finds it "already pending", and the domain sleeps forever).
 * For such engines only the vCPU's own thread, while no guest instruction runs, writes
 * the guest's event words: other threads leave the port in a host-side set and kick
 * it, and the vCPU applies the set before it runs the guest again or sleeps
 * (hv_events_flush). The event words (shared_info's bitmaps, every vcpu_info) are the
 * whole domain's, so whichever vCPU thread holds the domain's guest lock (vcpu.c), when
 * no vCPU of it runs guest code, writes them, for ports bound to any vCPU; other threads
 * defer to vCPU 0, which a deferred event wakes even when it is down or blocked. */
static struct hv_vcpu *event_writer(struct hv_domain *d)
{
    return d->vcpus[0];
}

static int must_defer(struct hv_domain *d, struct hv_vcpu *writer)
{
    return writer && !d->engine->guest_atomics && !hv_guest_lock_held(d);
}

static struct hv_vcpu *port_vcpu(struct hv_domain *d, uint32_t port)
{
    return d->vcpus[d->ports[port].vcpu < HV_MAX_VCPUS ? d->ports[port].vcpu : 0];
}

/* Caller holds d->ev_lock. */
static void set_pending(struct hv_domain *d, uint32_t port)
{
    struct hv_vcpu *writer = event_writer(d);

    if (must_defer(d, writer)) {
        d->deferred[port / BITS] |= 1ULL << (port % BITS);
        __atomic_store_n(&writer->deferred_events, 1, __ATOMIC_SEQ_CST);
        hv_vcpu_notify(writer);
        return;
    }
    raise_port(d, port_vcpu(d, port), port);
}

/* On the writer's own thread, with the guest stopped: raise what other threads deferred,
 * each port for the vCPU it is bound to. */
void hv_events_flush(struct hv_vcpu *v)
{
    struct hv_domain *d = v->dom;

    if (!__atomic_exchange_n(&v->deferred_events, 0, __ATOMIC_SEQ_CST))
        return;
    if (!d->engine->guest_atomics)
        hv_guest_lock(d);               /* no vCPU of the domain runs guest code now */
    pthread_mutex_lock(&d->ev_lock);
    for (uint32_t w = 0; w < (d->max_ports + BITS - 1) / BITS; w++) {
        uint64_t bits = d->deferred[w];
        d->deferred[w] = 0;
        while (bits) {
            uint32_t port = w * BITS + (uint32_t)__builtin_ctzll(bits);
            bits &= bits - 1;
            raise_port(d, port_vcpu(d, port), port);
        }
    }
    pthread_mutex_unlock(&d->ev_lock);
    if (!d->engine->guest_atomics)
        hv_guest_unlock(d);
}

int hv_send_virq(struct hv_domain *d, uint32_t vcpu, uint32_t virq)
{
    uint32_t port;
    if (vcpu >= HV_MAX_VCPUS || !d->vcpus[vcpu] || virq >= NR_VIRQS)
        return -XEN_EINVAL;
    hv_wakes_hold();                    /* the vCPU woken once ev_lock is let go */
    pthread_mutex_lock(&d->ev_lock);
    port = d->vcpus[vcpu]->virq_to_port[virq];
    if (port)
        set_pending(d, port);
    pthread_mutex_unlock(&d->ev_lock);
    hv_wakes_release();
    return port ? 0 : -XEN_ENOENT;
}

/* Ports pending and not masked, for the toolstack's `top` (read while the guest runs). */
int hv_domain_pending_events(struct hv_domain *d)
{
    struct shared_info *s;
    int n = 0;

    pthread_mutex_lock(&d->ev_lock);    /* shared_info does not move under us */
    s = hv_shared_info(d);
    for (uint32_t w = 0; w < (d->max_ports + BITS - 1) / BITS; w++)
        n += __builtin_popcountll(__atomic_load_n(&s->evtchn_pending[w], __ATOMIC_ACQUIRE) &
                                  ~__atomic_load_n(&s->evtchn_mask[w], __ATOMIC_ACQUIRE));
    pthread_mutex_unlock(&d->ev_lock);
    return n;
}

/* ---- notification and waiting ---- */

/* Is the port pending in shared_info (whatever its mask)? */
int hv_port_pending(struct hv_domain *d, uint32_t port)
{
    struct shared_info *s = hv_shared_info(d);
    if (port >= d->max_ports)
        return 0;
    return (__atomic_load_n(&s->evtchn_pending[port / BITS], __ATOMIC_ACQUIRE) >> (port % BITS)) & 1;
}

/* ---- event_channel_op ---- */

static int port_ok(struct hv_domain *d, uint32_t port)
{
    return port > 0 && port < d->max_ports;
}

/* Caller holds d->ev_lock. Port 0 is never handed out, as in Xen. */
static int alloc_port(struct hv_domain *d)
{
    for (uint32_t p = 1; p < d->max_ports; p++)
        if (d->ports[p].state == EVTCHNSTAT_closed) {
            memset(&d->ports[p], 0, sizeof(d->ports[p]));
            return (int)p;
        }
    return -XEN_ENOSPC;
}

static int self_or_id(struct hv_domain *d, uint16_t dom)
{
    return dom == DOMID_SELF || dom == d->domid;
}

static void lock_pair(struct hv_domain *a, struct hv_domain *b)
{
    if (a == b) {
        pthread_mutex_lock(&a->ev_lock);
    } else if (a->domid < b->domid) {
        pthread_mutex_lock(&a->ev_lock);
        pthread_mutex_lock(&b->ev_lock);
    } else {
        pthread_mutex_lock(&b->ev_lock);
        pthread_mutex_lock(&a->ev_lock);
    }
}

static void unlock_pair(struct hv_domain *a, struct hv_domain *b)
{
    pthread_mutex_unlock(&a->ev_lock);
    if (a != b)
        pthread_mutex_unlock(&b->ev_lock);
}

static int evtchn_alloc_unbound(struct hv_domain *d, struct evtchn_alloc_unbound *a)
{
    uint16_t remote = a->remote_dom == DOMID_SELF ? d->domid : a->remote_dom;
    int port;

    if (!self_or_id(d, a->dom))
        return -XEN_EPERM;              /* only a privileged domain allocates for others */
    pthread_mutex_lock(&registry_lock);
    if (remote != 0 && !hv_domain_lookup(remote)) {   /* dom0: trapless's backends */
        pthread_mutex_unlock(&registry_lock);
        return -XEN_ESRCH;
    }
    pthread_mutex_lock(&d->ev_lock);
    port = alloc_port(d);
    if (port > 0) {
        d->ports[port].state = EVTCHNSTAT_unbound;
        d->ports[port].remote_dom = remote;
        a->port = (uint32_t)port;
    }
    pthread_mutex_unlock(&d->ev_lock);
    pthread_mutex_unlock(&registry_lock);
    return port < 0 ? port : 0;
}

static int evtchn_bind_interdomain(struct hv_domain *d, struct evtchn_bind_interdomain *b)
{
    uint16_t rdom = b->remote_dom == DOMID_SELF ? d->domid : b->remote_dom;
    struct hv_domain *r;
    int port, rc = 0;

    pthread_mutex_lock(&registry_lock);
    r = hv_domain_lookup(rdom);
    if (!r) {
        pthread_mutex_unlock(&registry_lock);
        return -XEN_ESRCH;
    }
    lock_pair(d, r);
    if (!port_ok(r, b->remote_port) || r->ports[b->remote_port].state != EVTCHNSTAT_unbound ||
        r->ports[b->remote_port].remote_dom != d->domid) {
        rc = -XEN_EINVAL;
    } else if ((port = alloc_port(d)) < 0) {
        rc = port;
    } else {
        d->ports[port].state = EVTCHNSTAT_interdomain;
        __atomic_store_n(&d->has_interdomain, 1, __ATOMIC_RELEASE);
        __atomic_store_n(&r->has_interdomain, 1, __ATOMIC_RELEASE);
        d->ports[port].remote_dom = rdom;
        d->ports[port].remote_port = b->remote_port;
        r->ports[b->remote_port].state = EVTCHNSTAT_interdomain;
        r->ports[b->remote_port].remote_dom = d->domid;
        r->ports[b->remote_port].remote_port = (uint32_t)port;
        b->local_port = (uint32_t)port;
        /* Xen marks the new local port pending so no event sent before the bind is lost. */
        set_pending(d, (uint32_t)port);
    }
    unlock_pair(d, r);
    pthread_mutex_unlock(&registry_lock);
    return rc;
}

static int virq_is_global(uint32_t virq)
{
    return virq != VIRQ_TIMER && virq != VIRQ_DEBUG && virq != VIRQ_XENOPROF && virq != VIRQ_XENPMU;
}

static int evtchn_bind_virq(struct hv_domain *d, struct evtchn_bind_virq *b)
{
    struct hv_vcpu *v;
    int port;

    if (b->virq >= NR_VIRQS)
        return -XEN_EINVAL;
    if (virq_is_global(b->virq) && b->vcpu != 0)
        return -XEN_EINVAL;
    if (b->vcpu >= HV_MAX_VCPUS || !(v = d->vcpus[b->vcpu]))
        return -XEN_ENOENT;
    pthread_mutex_lock(&d->ev_lock);
    if (v->virq_to_port[b->virq]) {
        port = -XEN_EEXIST;
    } else if ((port = alloc_port(d)) > 0) {
        d->ports[port].state = EVTCHNSTAT_virq;
        d->ports[port].virq = b->virq;
        d->ports[port].vcpu = b->vcpu;
        v->virq_to_port[b->virq] = (uint32_t)port;
        b->port = (uint32_t)port;
    }
    pthread_mutex_unlock(&d->ev_lock);
    return port < 0 ? port : 0;
}

static int evtchn_bind_ipi(struct hv_domain *d, struct evtchn_bind_ipi *b)
{
    int port;
    if (b->vcpu >= HV_MAX_VCPUS || !d->vcpus[b->vcpu])
        return -XEN_ENOENT;
    pthread_mutex_lock(&d->ev_lock);
    if ((port = alloc_port(d)) > 0) {
        d->ports[port].state = EVTCHNSTAT_ipi;
        d->ports[port].vcpu = b->vcpu;
        b->port = (uint32_t)port;
    }
    pthread_mutex_unlock(&d->ev_lock);
    return port < 0 ? port : 0;
}

static int evtchn_close(struct hv_domain *d, uint32_t port)
{
    struct hv_evtchn *c;
    struct hv_domain *r = NULL;
    int rc = 0;

    if (!port_ok(d, port))
        return -XEN_EINVAL;
    pthread_mutex_lock(&registry_lock);
    pthread_mutex_lock(&d->ev_lock);
    c = &d->ports[port];
    if (c->state == EVTCHNSTAT_interdomain && !c->backend && !c->backend_fn)
        r = hv_domain_lookup(c->remote_dom);
    pthread_mutex_unlock(&d->ev_lock);
    if (r)
        lock_pair(d, r);
    else
        pthread_mutex_lock(&d->ev_lock);
    switch (c->state) {
    case EVTCHNSTAT_closed:
        rc = -XEN_EINVAL;
        break;
    case EVTCHNSTAT_virq:
        if (c->vcpu < HV_MAX_VCPUS && d->vcpus[c->vcpu])
            d->vcpus[c->vcpu]->virq_to_port[c->virq] = 0;
        break;
    case EVTCHNSTAT_interdomain:
        if (r && r->ports[c->remote_port].state == EVTCHNSTAT_interdomain &&
            r->ports[c->remote_port].remote_dom == d->domid) {
            /* The peer's end becomes unbound, waiting for us again. */
            r->ports[c->remote_port].state = EVTCHNSTAT_unbound;
            r->ports[c->remote_port].remote_dom = d->domid;
        }
        break;
    default:
        break;
    }
    if (rc == 0)
        memset(c, 0, sizeof(*c));
    if (r)
        unlock_pair(d, r);
    else
        pthread_mutex_unlock(&d->ev_lock);
    pthread_mutex_unlock(&registry_lock);
    return rc;
}

static int evtchn_send(struct hv_domain *d, uint32_t port)
{
    struct hv_evtchn c;
    struct hv_domain *r;

    if (!port_ok(d, port))
        return -XEN_EINVAL;
    hv_wakes_hold();                    /* a vCPU woken once ev_lock is let go */
    pthread_mutex_lock(&d->ev_lock);
    c = d->ports[port];
    if (c.state == EVTCHNSTAT_ipi)
        set_pending(d, port);
    /* under the lock, so that it never runs once the backend has unbound (it only
     * wakes the backend's thread) */
    if (c.state == EVTCHNSTAT_interdomain && c.backend_fn)
        c.backend_fn(c.backend_arg);
    pthread_mutex_unlock(&d->ev_lock);
    hv_wakes_release();

    if (c.state == EVTCHNSTAT_interdomain && c.backend_fn)
        return 0;
    if (c.state == EVTCHNSTAT_interdomain && c.backend) {
        c.backend(d);                   /* the other end is trapless itself (see below) */
        return 0;
    }
    switch (c.state) {
    case EVTCHNSTAT_ipi:
    case EVTCHNSTAT_unbound:            /* nobody listens yet: silently dropped, as in Xen */
        return 0;
    case EVTCHNSTAT_interdomain:
        hv_wakes_hold();                /* its vCPU woken once the locks are let go */
        pthread_mutex_lock(&registry_lock);
        r = hv_domain_lookup(c.remote_dom);
        if (r) {
            pthread_mutex_lock(&r->ev_lock);
            if (port_ok(r, c.remote_port) && r->ports[c.remote_port].state == EVTCHNSTAT_interdomain)
                set_pending(r, c.remote_port);
            pthread_mutex_unlock(&r->ev_lock);
        }
        pthread_mutex_unlock(&registry_lock);
        hv_wakes_release();
        return 0;
    default:
        return -XEN_EINVAL;
    }
}

static int evtchn_status(struct hv_domain *d, struct evtchn_status *st)
{
    struct hv_evtchn *c;
    if (!self_or_id(d, st->dom))
        return -XEN_EPERM;
    if (!port_ok(d, st->port))
        return -XEN_EINVAL;
    pthread_mutex_lock(&d->ev_lock);
    c = &d->ports[st->port];
    st->status = c->state;
    st->vcpu = c->vcpu;
    st->u_dom = 0;
    st->_pad1 = 0;
    st->u_port = 0;
    switch (c->state) {
    case EVTCHNSTAT_unbound:
        st->u_dom = c->remote_dom;
        break;
    case EVTCHNSTAT_interdomain:
        st->u_dom = c->remote_dom;
        st->u_port = c->remote_port;
        break;
    case EVTCHNSTAT_virq:
        memcpy(&st->u_dom, &c->virq, 4);   /* the union's virq sits at offset 16 */
        break;
    }
    pthread_mutex_unlock(&d->ev_lock);
    return 0;
}

static int evtchn_unmask(struct hv_domain *d, uint32_t port)
{
    struct shared_info *s;
    uint64_t bit = 1ULL << (port % BITS);
    struct hv_vcpu *v;

    if (!port_ok(d, port))
        return -XEN_EINVAL;
    pthread_mutex_lock(&d->ev_lock);
    s = hv_shared_info(d);
    __atomic_fetch_and(&s->evtchn_mask[port / BITS], ~bit, __ATOMIC_SEQ_CST);
    v = d->vcpus[d->ports[port].vcpu < HV_MAX_VCPUS ? d->ports[port].vcpu : 0];
    if (v && (__atomic_load_n(&s->evtchn_pending[port / BITS], __ATOMIC_SEQ_CST) & bit))
        mark_upcall(v, port);
    pthread_mutex_unlock(&d->ev_lock);
    return 0;
}

static int evtchn_bind_vcpu(struct hv_domain *d, struct evtchn_bind_vcpu *b)
{
    struct hv_evtchn *c;
    int rc = 0;

    if (!port_ok(d, b->port))
        return -XEN_EINVAL;
    if (b->vcpu >= HV_MAX_VCPUS || !d->vcpus[b->vcpu])
        return -XEN_ENOENT;
    pthread_mutex_lock(&d->ev_lock);
    c = &d->ports[b->port];
    switch (c->state) {
    case EVTCHNSTAT_virq:
        if (!virq_is_global(c->virq)) {
            rc = -XEN_EINVAL;           /* per-vCPU VIRQs stay where they were bound */
            break;
        }
        d->vcpus[c->vcpu]->virq_to_port[c->virq] = 0;
        d->vcpus[b->vcpu]->virq_to_port[c->virq] = b->port;
        c->vcpu = b->vcpu;
        break;
    case EVTCHNSTAT_unbound:
    case EVTCHNSTAT_interdomain:
        c->vcpu = b->vcpu;
        break;
    default:
        rc = -XEN_EINVAL;
    }
    pthread_mutex_unlock(&d->ev_lock);
    return rc;
}

/* ---- ports whose other end is a backend inside trapless (console_ring.c) ----
 * Xen's toolstack gives a domU ports bound to daemons in dom0 (xenconsoled, ...). Here
 * the daemon is part of trapless: the port is interdomain with dom0 (remote port 0:
 * there is no dom0 port table), and a send calls the backend instead of raising a peer. */

int hv_evtchn_bind_backend(struct hv_domain *d, void (*backend)(struct hv_domain *d))
{
    int port;
    pthread_mutex_lock(&d->ev_lock);
    if ((port = alloc_port(d)) > 0) {
        d->ports[port].state = EVTCHNSTAT_interdomain;
        d->ports[port].remote_dom = 0;
        d->ports[port].backend = backend;
    }
    pthread_mutex_unlock(&d->ev_lock);
    return port;
}

int hv_evtchn_bind_backend_port(struct hv_domain *d, uint32_t port, void (*fn)(void *arg),
                                void *arg)
{
    int rc = -XEN_EINVAL;
    pthread_mutex_lock(&d->ev_lock);
    if (port_ok(d, port) && d->ports[port].state == EVTCHNSTAT_unbound &&
        d->ports[port].remote_dom == 0) {
        d->ports[port].state = EVTCHNSTAT_interdomain;
        d->ports[port].remote_port = 0;         /* there is no dom0 port table */
        d->ports[port].backend_fn = fn;
        d->ports[port].backend_arg = arg;
        rc = 0;
    }
    pthread_mutex_unlock(&d->ev_lock);
    return rc;
}

void hv_evtchn_unbind_backend(struct hv_domain *d, uint32_t port)
{
    pthread_mutex_lock(&d->ev_lock);
    if (port_ok(d, port) && d->ports[port].state == EVTCHNSTAT_interdomain &&
        d->ports[port].backend_fn) {
        d->ports[port].state = EVTCHNSTAT_unbound;  /* as Xen leaves it when dom0 closes */
        d->ports[port].backend_fn = NULL;
        d->ports[port].backend_arg = NULL;
    }
    pthread_mutex_unlock(&d->ev_lock);
}

/* The backend raises the guest's port (unless the guest has closed it meanwhile). */
void hv_evtchn_backend_notify(struct hv_domain *d, uint32_t port)
{
    hv_wakes_hold();                    /* the vCPU woken once ev_lock is let go */
    pthread_mutex_lock(&d->ev_lock);
    if (port_ok(d, port) && d->ports[port].state == EVTCHNSTAT_interdomain &&
        (d->ports[port].backend || d->ports[port].backend_fn))
        set_pending(d, port);
    pthread_mutex_unlock(&d->ev_lock);
    hv_wakes_release();
}

/* Copy the argument in, run op, copy it back out when the op has outputs. */
#define WITH_ARG(type, call, out)                                   \
    do {                                                            \
        type a;                                                     \
        int rc;                                                     \
        if (hv_copy_from_guest(v, &a, h->a2, sizeof(a)) < 0)        \
            return -XEN_EFAULT;                                     \
        rc = call;                                                  \
        if (rc == 0 && (out) && hv_copy_to_guest(v, h->a2, &a, sizeof(a)) < 0) \
            return -XEN_EFAULT;                                     \
        return rc;                                                  \
    } while (0)

int64_t do_event_channel_op(struct hv_vcpu *v, const struct hv_hcall *h)
{
    struct hv_domain *d = v->dom;

    switch ((int32_t)h->a1) {
    case EVTCHNOP_alloc_unbound:
        WITH_ARG(struct evtchn_alloc_unbound, evtchn_alloc_unbound(d, &a), 1);
    case EVTCHNOP_bind_interdomain:
        WITH_ARG(struct evtchn_bind_interdomain, evtchn_bind_interdomain(d, &a), 1);
    case EVTCHNOP_bind_virq:
        WITH_ARG(struct evtchn_bind_virq, evtchn_bind_virq(d, &a), 1);
    case EVTCHNOP_bind_ipi:
        WITH_ARG(struct evtchn_bind_ipi, evtchn_bind_ipi(d, &a), 1);
    case EVTCHNOP_close:
        WITH_ARG(struct evtchn_close, evtchn_close(d, a.port), 0);
    case EVTCHNOP_send:
        WITH_ARG(struct evtchn_send, evtchn_send(d, a.port), 0);
    case EVTCHNOP_status:
        WITH_ARG(struct evtchn_status, evtchn_status(d, &a), 1);
    case EVTCHNOP_unmask:
        WITH_ARG(struct evtchn_unmask, evtchn_unmask(d, a.port), 0);
    case EVTCHNOP_bind_vcpu:
        WITH_ARG(struct evtchn_bind_vcpu, evtchn_bind_vcpu(d, &a), 0);
    default:
        return -XEN_ENOSYS;
    }
}

/* ---- hvm_op: the upcall vector and parameters ---- */

static int hvm_set_param(struct hv_domain *d, struct xen_hvm_param *p)
{
    if (p->index == HVM_PARAM_CALLBACK_IRQ) {
        uint64_t type = p->value >> HVM_PARAM_CALLBACK_TYPE_SHIFT;
        uint8_t vector = (uint8_t)p->value;
        if (p->value == 0) {
            d->callback_vector = 0;     /* upcalls off */
        } else if (type == HVM_PARAM_CALLBACK_TYPE_GSI && d->guest_type == HV_GUEST_PVH) {
            /* Xen takes a GSI from an HVM domain; a PVH one has no IO-APIC or PIC to
             * raise it on, so nothing arrives through it. Linux sets GSI 1 once it has
             * per-vCPU upcall vectors, so that the toolstack sees an enlightened guest. */
            d->callback_vector = 0;
        } else if (type != HVM_PARAM_CALLBACK_TYPE_VECTOR) {
            return -XEN_EINVAL;         /* no emulated GSI or PCI INTx line to route to */
        } else if (vector < 0x10 || (p->value & 0x00ffffffffffff00ULL)) {
            return -XEN_EINVAL;         /* exception vectors cannot carry upcalls */
        } else {
            d->callback_vector = vector;
        }
    } else {
        return -XEN_EPERM;              /* the other parameters are the toolstack's */
    }
    d->hvm_params[p->index] = p->value;
    return 0;
}

/* HVMOP_set_evtchn_upcall_vector: the vCPU's events arrive on this vector of its local
 * APIC from now on; one already pending is asserted at once (Xen's
 * hvmop_set_evtchn_upcall_vector). Only a vCPU with a local APIC (PVH) has one. */
static int64_t hvm_set_upcall_vector(struct hv_vcpu *v, uint64_t arg)
{
    struct xen_hvm_evtchn_upcall_vector op;
    struct hv_vcpu *target;

    if (!v->lapic)
        return -XEN_EINVAL;
    if (hv_copy_from_guest(v, &op, arg, sizeof(op)) < 0)
        return -XEN_EFAULT;
    if (op.vector < 0x10)
        return -XEN_EINVAL;
    if (op.vcpu >= HV_MAX_VCPUS || !(target = v->dom->vcpus[op.vcpu]))
        return -XEN_ENOENT;
    target->upcall_vector = op.vector;
    if (__atomic_load_n(&hv_vcpu_info(target)->evtchn_upcall_pending, __ATOMIC_ACQUIRE)) {
        hv_lapic_set_irq(target, op.vector);
        hv_vcpu_notify(target);
    }
    return 0;
}

int64_t do_hvm_op(struct hv_vcpu *v, const struct hv_hcall *h)
{
    struct xen_hvm_param p;
    int set;

    switch ((int32_t)h->a1) {
    case HVMOP_set_param:
    case HVMOP_get_param:
        set = (int32_t)h->a1 == HVMOP_set_param;
        if (hv_copy_from_guest(v, &p, h->a2, sizeof(p)) < 0)
            return -XEN_EFAULT;
        if (!self_or_id(v->dom, p.domid))
            return -XEN_ESRCH;
        if (p.index >= HVM_NR_PARAMS)
            return -XEN_EINVAL;
        if (set)
            return hvm_set_param(v->dom, &p);
        p.value = v->dom->hvm_params[p.index];
        return hv_copy_to_guest(v, h->a2, &p, sizeof(p)) < 0 ? -XEN_EFAULT : 0;
    case HVMOP_set_evtchn_upcall_vector:
        return hvm_set_upcall_vector(v, h->a2);
    default:
        return -XEN_ENOSYS;
    }
}
