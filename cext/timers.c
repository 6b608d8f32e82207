/*
 * timers.c - the timer service: system time, the PV clock, one-shot and periodic timers.
 *
 * System time is the host's CLOCK_MONOTONIC in ns, the same for every domain. Each
 * vCPU's vcpu_time_info lets the guest compute it from rdtsc with no exit:
 * now = system_time + ((rdtsc - tsc_timestamp) << shift) * mul >> 32.
 * One thread for the whole process sleeps until the earliest deadline of any domain,
 * then makes VIRQ_TIMER pending, which wakes a blocked vCPU or kicks a running one.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <x86intrin.h>

#include "hv.h"

uint64_t hv_system_time(void)
{
    return hv_now_ns();
}

/* mul/shift such that ns = ((ticks << shift) * mul) >> 32 (shift may be negative). */
static void time_scale(uint64_t tsc_hz, uint32_t *mul, int8_t *shift)
{
    uint64_t tps = tsc_hz;
    int s = 0;
    while (tps > 2000000000ULL) {
        tps >>= 1;
        s--;
    }
    while (tps <= 1000000000ULL) {
        tps <<= 1;
        s++;
    }
    *mul = (uint32_t)((1000000000ULL << 32) / tps);
    *shift = (int8_t)s;
}

int hv_pvclock_init(struct hv_vcpu *v, int64_t tsc_offset, uint64_t tsc_khz)
{
    if (tsc_khz == 0)
        return -1;
    v->tsc_offset = tsc_offset;
    time_scale(tsc_khz * 1000ULL, &v->tsc_to_system_mul, &v->tsc_shift);
    hv_pvclock_update(v);
    return 0;
}

/* Write a fresh (tsc_timestamp, system_time) pair with the odd/even version protocol. */
void hv_pvclock_update(struct hv_vcpu *v)
{
    struct vcpu_time_info *t;
    uint64_t now, tsc;
    uint32_t version;

    if (v->tsc_to_system_mul == 0)
        return;
    pthread_mutex_lock(&v->time_lock);
    t = &hv_vcpu_info(v)->time;
    version = v->time_version;                  /* even */
    __atomic_store_n(&t->version, version + 1, __ATOMIC_SEQ_CST);
    tsc = __rdtsc();
    now = hv_system_time();
    t->tsc_timestamp = tsc + (uint64_t)v->tsc_offset;
    t->system_time = now;
    t->tsc_to_system_mul = v->tsc_to_system_mul;
    t->tsc_shift = v->tsc_shift;
    t->flags = XEN_PVCLOCK_TSC_STABLE_BIT;
    __atomic_store_n(&t->version, version + 2, __ATOMIC_SEQ_CST);
    v->time_version = version + 2;
    pthread_mutex_unlock(&v->time_lock);
}

/* ---- the timer thread: one for the whole process ----
 *
 * Every domain with a deadline (a vCPU's one-shot or periodic timer, or its PIT) sits
 * in one min-heap keyed by its earliest deadline. The thread sleeps until the top of
 * the heap is due, takes every due domain out, fires what is due outside the lock (the
 * event path takes other locks), and puts each domain back under its next deadline.
 * A thousand idle domains cost nothing: no deadline, no place in the heap, no wakeup.
 *
 * Lock order: tq_lock, then a domain's ev_lock / wait_lock / device lock.
 */

static pthread_mutex_t tq_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t tq_cond;          /* the thread: something new may be due sooner */
static pthread_cond_t tq_served;        /* hv_timers_stop: the thread let a domain go */
static struct hv_domain **heap;         /* heap[0] has the earliest deadline */
static uint32_t heap_len, heap_cap;
static pthread_t tq_thread;
static int tq_started;

static int heap_before(uint32_t a, uint32_t b)
{
    return heap[a]->timer_key < heap[b]->timer_key;
}

static void heap_swap(uint32_t a, uint32_t b)
{
    struct hv_domain *t = heap[a];
    heap[a] = heap[b];
    heap[b] = t;
    heap[a]->timer_slot = (int32_t)a;
    heap[b]->timer_slot = (int32_t)b;
}

static void heap_fix(uint32_t i)
{
    while (i > 0 && heap_before(i, (i - 1) / 2)) {
        heap_swap(i, (i - 1) / 2);
        i = (i - 1) / 2;
    }
    for (;;) {
        uint32_t l = 2 * i + 1, r = l + 1, m = i;
        if (l < heap_len && heap_before(l, m))
            m = l;
        if (r < heap_len && heap_before(r, m))
            m = r;
        if (m == i)
            return;
        heap_swap(i, m);
        i = m;
    }
}

static void heap_remove(struct hv_domain *d)
{
    uint32_t i;
    if (d->timer_slot < 0)
        return;
    i = (uint32_t)d->timer_slot;
    d->timer_slot = -1;
    if (i != --heap_len) {
        heap[i] = heap[heap_len];
        heap[i]->timer_slot = (int32_t)i;
        heap_fix(i);
    }
}

/* Caller holds tq_lock. The domain's earliest deadline of all its timers. */
static uint64_t earliest(struct hv_domain *d)
{
    uint64_t next = d->device_deadline;
    for (int i = 0; i < HV_MAX_VCPUS; i++) {
        struct hv_vcpu *v = d->vcpus[i];
        if (!v)
            continue;
        if (v->timers.singleshot && v->timers.singleshot < next)
            next = v->timers.singleshot;
        if (v->timers.period && v->timers.next_periodic < next)
            next = v->timers.next_periodic;
        if (v->wait_deadline && v->wait_deadline < next)
            next = v->wait_deadline;
        if (v->lapic_deadline && v->lapic_deadline < next)
            next = v->lapic_deadline;
    }
    return next;
}

/* Caller holds tq_lock: (re)place d in the heap under key. 0, or -1 out of memory
 * (then d keeps its old place, or none: its timers fire late, nothing breaks). */
static int heap_set(struct hv_domain *d, uint64_t key)
{
    if (d->timer_stopping)
        return 0;
    if (d->timer_in_service)
        return 0;                       /* the thread puts it back when it is done */
    if (key == HV_NO_DEADLINE) {
        heap_remove(d);
        return 0;
    }
    if (d->timer_slot < 0) {
        if (heap_len == heap_cap) {
            uint32_t cap = heap_cap ? heap_cap * 2 : 64;
            struct hv_domain **h = realloc(heap, cap * sizeof(*h));
            if (!h)
                return -1;
            heap = h;
            heap_cap = cap;
        }
        heap[heap_len] = d;
        d->timer_slot = (int32_t)heap_len++;
    }
    d->timer_key = key;
    heap_fix((uint32_t)d->timer_slot);
    if (d->timer_slot == 0)
        pthread_cond_signal(&tq_cond);  /* the thread's sleep may now be too long */
    return 0;
}

/* Caller holds tq_lock. */
static void reschedule(struct hv_domain *d)
{
    heap_set(d, d->timer_rewake ? 0 : earliest(d));
}

static void fire(struct hv_vcpu *v)
{
    hv_pvclock_update(v);
    if (hv_send_virq(v->dom, (uint32_t)v->id, VIRQ_TIMER) == 0)
        v->timers.fired++;
}

/* Caller holds tq_lock; d is out of the heap and in service. Lets the lock go while
 * raising what is due, and takes it again. */
static void serve(struct hv_domain *d, uint64_t now)
{
    struct hv_vcpu *due[HV_MAX_VCPUS], *woken[HV_MAX_VCPUS], *lapic_due[HV_MAX_VCPUS];
    int ndue = 0, nwoken = 0, nlapic = 0;

    for (int i = 0; i < HV_MAX_VCPUS; i++) {
        struct hv_vcpu *v = d->vcpus[i];
        int expired = 0;
        if (!v)
            continue;
        if (v->timers.singleshot && v->timers.singleshot <= now) {
            v->timers.singleshot = 0;
            expired = 1;
        }
        if (v->timers.period && v->timers.next_periodic <= now) {
            v->timers.next_periodic += v->timers.period;
            if (v->timers.next_periodic <= now)     /* we fell behind: skip, don't burst */
                v->timers.next_periodic = now + v->timers.period;
            expired = 1;
        }
        if (expired)
            due[ndue++] = v;
        if (v->wait_deadline && v->wait_deadline <= now) {
            v->wait_deadline = 0;
            woken[nwoken++] = v;
        }
        if (v->lapic_deadline && v->lapic_deadline <= now) {
            v->lapic_deadline = 0;      /* the APIC says when it is due next */
            lapic_due[nlapic++] = v;
        }
    }
    pthread_mutex_unlock(&tq_lock);
    for (int i = 0; i < ndue; i++)
        fire(due[i]);
    for (int i = 0; i < nlapic; i++)
        hv_lapic_timer_expired(lapic_due[i], now);
    for (int i = 0; i < nwoken; i++)
        hv_vcpu_deadline_passed(woken[i]);
    /* A native domain's PIT: raises what is due, says when it next needs us. */
    {
        uint64_t device_next = hv_devices_timer(d);
        pthread_mutex_lock(&tq_lock);
        d->device_deadline = device_next;
    }
}

static void *timer_main(void *unused)
{
    prctl(PR_SET_NAME, "timers");       /* what top, perf and /proc/PID/task call it */
    pthread_mutex_lock(&tq_lock);
    for (;;) {
        uint64_t now = hv_system_time();
        if (heap_len == 0) {
            pthread_cond_wait(&tq_cond, &tq_lock);
            continue;
        }
        if (heap[0]->timer_key > now) {
            uint64_t next = heap[0]->timer_key;
            struct timespec ts = { .tv_sec = (time_t)(next / 1000000000ULL),
                                   .tv_nsec = (long)(next % 1000000000ULL) };
            pthread_cond_timedwait(&tq_cond, &tq_lock, &ts);
            continue;
        }
        struct hv_domain *d = heap[0];
        heap_remove(d);
        d->timer_in_service = 1;
        d->timer_rewake = 0;            /* serve() asks the devices afresh */
        serve(d, now);
        d->timer_in_service = 0;
        reschedule(d);
        pthread_cond_broadcast(&tq_served);
    }
    return NULL;
}

int hv_timers_start(struct hv_domain *d, char *err, int err_len)
{
    int rc = 0;

    d->timer_slot = -1;
    d->device_deadline = HV_NO_DEADLINE;
    pthread_mutex_lock(&tq_lock);
    if (!tq_started) {
        pthread_condattr_t attr;
        pthread_condattr_init(&attr);
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);  /* deadlines are system time */
        pthread_cond_init(&tq_cond, &attr);
        pthread_condattr_destroy(&attr);
        pthread_cond_init(&tq_served, NULL);
        rc = pthread_create(&tq_thread, NULL, timer_main, NULL);
        if (rc == 0) {
            pthread_detach(tq_thread);  /* it serves the process until the process ends */
            tq_started = 1;
        }
    }
    pthread_mutex_unlock(&tq_lock);
    if (rc) {
        hv_set_error(err, err_len, "cannot start the timer thread: %s", strerror(rc));
        return -1;
    }
    d->timers_registered = 1;
    return 0;
}

/* Take the domain out for good; returns once the thread no longer touches it. */
void hv_timers_stop(struct hv_domain *d)
{
    if (!d->timers_registered)
        return;
    pthread_mutex_lock(&tq_lock);
    d->timer_stopping = 1;
    heap_remove(d);
    while (d->timer_in_service)
        pthread_cond_wait(&tq_served, &tq_lock);
    pthread_mutex_unlock(&tq_lock);
    d->timers_registered = 0;
}

/* Something outside the vCPU timers moved (the PIT was programmed): look now. */
void hv_timers_wake(struct hv_domain *d)
{
    pthread_mutex_lock(&tq_lock);
    if (d->timers_registered) {
        d->timer_rewake = 1;
        reschedule(d);
    }
    pthread_mutex_unlock(&tq_lock);
}

void hv_timers_set_wait(struct hv_vcpu *v, uint64_t deadline)
{
    if (!deadline && !v->wait_deadline)
        return;                         /* the common case costs no lock */
    pthread_mutex_lock(&tq_lock);
    v->wait_deadline = deadline;
    v->park_deadline = deadline;
    reschedule(v->dom);
    pthread_mutex_unlock(&tq_lock);
}

/* The local APIC's timer (dev_lapic.c) moved: its next expiry in system time. */
void hv_timers_set_lapic(struct hv_vcpu *v, uint64_t deadline)
{
    pthread_mutex_lock(&tq_lock);
    v->lapic_deadline = deadline;
    reschedule(v->dom);
    pthread_mutex_unlock(&tq_lock);
}

static void set_singleshot(struct hv_vcpu *v, uint64_t deadline)
{
    pthread_mutex_lock(&tq_lock);
    v->timers.singleshot = deadline;
    reschedule(v->dom);
    pthread_mutex_unlock(&tq_lock);
}

static void set_periodic(struct hv_vcpu *v, uint64_t period)
{
    pthread_mutex_lock(&tq_lock);
    v->timers.period = period;
    v->timers.next_periodic = period ? hv_system_time() + period : 0;
    reschedule(v->dom);
    pthread_mutex_unlock(&tq_lock);
}

/* ---- hypercalls ---- */

int64_t do_set_timer_op(struct hv_vcpu *v, const struct hv_hcall *h)
{
    /* 0 stops the timer; a time already past fires at once (the thread sees it due). */
    set_singleshot(v, h->a1);
    return 0;
}

/* ---- runstate: the time a vCPU spent running, runnable (queued for a worker) and
 * blocked (parked), as Xen accounts it at every schedule ---- */

/* Caller holds v->wait_lock, which every change of scheduling state takes. */
void hv_runstate_enter(struct hv_vcpu *v, int state)
{
    struct vcpu_runstate_info *r = &v->runstate;
    uint64_t now = hv_system_time();
    if (r->state_entry_time && now > r->state_entry_time)
        r->time[r->state] += now - r->state_entry_time;
    r->state = state;
    r->state_entry_time = now;
}

/* The accounting up to now (Xen's vcpu_runstate_get). */
static void runstate_now(struct hv_vcpu *v, struct vcpu_runstate_info *out)
{
    uint64_t now = hv_system_time();
    pthread_mutex_lock(&v->wait_lock);
    *out = v->runstate;
    pthread_mutex_unlock(&v->wait_lock);
    if (out->state_entry_time && now > out->state_entry_time)
        out->time[out->state] += now - out->state_entry_time;
}

/* Write the registered area, as Xen does when it schedules the vCPU in or out. The area
 * is a guest virtual address: translate (the guest's page tables, from the thread that
 * runs the vCPU while it is stopped) or use where it was last found, for a vCPU that
 * has just parked and may already run elsewhere. An area that is not mapped, or that
 * crosses a page, is skipped, as Xen skips a write that faults. */
void hv_runstate_publish(struct hv_vcpu *v, int translate)
{
    struct vcpu_runstate_info r, *area;
    uint64_t gpa;

    if (!v->runstate_area)
        return;
    if (translate) {
        if (hv_gva_to_gpa(v, v->runstate_area, 1, &gpa) < 0 ||
            (gpa & (HV_PAGE_SIZE - 1)) + sizeof(r) > HV_PAGE_SIZE ||
            !hv_gpa_valid(v->dom, gpa, sizeof(r)))
            gpa = HV_NO_PAGE;
        __atomic_store_n(&v->runstate_gpa, gpa, __ATOMIC_RELEASE);
    }
    gpa = __atomic_load_n(&v->runstate_gpa, __ATOMIC_ACQUIRE);
    if (gpa == HV_NO_PAGE)
        return;
    pthread_mutex_lock(&v->wait_lock);
    r = v->runstate;
    pthread_mutex_unlock(&v->wait_lock);
    /* state_entry_time last: a guest that rereads it around its copy (Linux) sees a
     * change and reads again rather than a mix */
    area = (struct vcpu_runstate_info *)(v->dom->ram + gpa);
    memcpy(area->time, r.time, sizeof(r.time));
    area->state = r.state;
    __atomic_store_n(&area->state_entry_time, r.state_entry_time, __ATOMIC_RELEASE);
}

static int64_t runstate_info(struct hv_vcpu *v, struct hv_vcpu *target, uint64_t arg)
{
    struct vcpu_runstate_info r;
    runstate_now(target, &r);
    return hv_copy_to_guest(v, arg, &r, sizeof(r)) < 0 ? -XEN_EFAULT : 0;
}

/* Xen keeps the area up to date at each context switch; a trapless vCPU has the
 * processor to itself, so it is running whenever it can look: the area is written when
 * it is registered and whenever the guest asks for its runstate. As in Xen, the handle
 * is taken as it is and a write that faults is not an error. */
static int64_t register_runstate_area(struct hv_vcpu *caller, struct hv_vcpu *v, uint64_t arg)
{
    struct vcpu_register_runstate_memory_area area;
    /* the argument is in the caller's memory: the target may not run yet (no engine) */
    if (hv_copy_from_guest(caller, &area, arg, sizeof(area)) < 0)
        return -XEN_EFAULT;
    v->runstate_area = area.addr;
    hv_runstate_publish(v, 1);
    return 0;
}

static int64_t register_vcpu_info(struct hv_vcpu *caller, struct hv_vcpu *v, uint64_t arg)
{
    struct vcpu_register_vcpu_info r;
    uint64_t gpa;

    /* the argument is in the caller's memory: the target may not run yet (no engine) */
    if (hv_copy_from_guest(caller, &r, arg, sizeof(r)) < 0)
        return -XEN_EFAULT;
    if (r.offset > HV_PAGE_SIZE - sizeof(struct vcpu_info))
        return -XEN_EINVAL;
    if (!hv_mm_frame_usable(v->dom, r.mfn))
        return -XEN_EINVAL;             /* populated RAM outside the page-table pool only */
    gpa = (r.mfn << HV_PAGE_SHIFT) + r.offset;
    if (v->vcpu_info_gpa != HV_NO_PAGE)
        return -XEN_EINVAL;             /* Xen allows registering once */
    pthread_mutex_lock(&v->dom->ev_lock);
    pthread_mutex_lock(&v->time_lock);
    memcpy(v->dom->ram + gpa, hv_vcpu_info(v), sizeof(struct vcpu_info));
    v->vcpu_info_gpa = gpa;
    pthread_mutex_unlock(&v->time_lock);
    pthread_mutex_unlock(&v->dom->ev_lock);
    hv_pvclock_update(v);
    return 0;
}

int64_t do_vcpu_op(struct hv_vcpu *v, const struct hv_hcall *h)
{
    int32_t cmd = (int32_t)h->a1;
    uint32_t id = (uint32_t)h->a2;
    struct hv_vcpu *target;

    if (id >= HV_MAX_VCPUS || !(target = v->dom->vcpus[id]))
        return -XEN_ENOENT;

    switch (cmd) {
    case VCPUOP_initialise:
    case VCPUOP_up:
    case VCPUOP_down:
    case VCPUOP_is_up:
        return hv_vcpu_life_op(v, cmd, target, h->a3);
    case VCPUOP_get_runstate_info:
        return runstate_info(v, target, h->a3);
    case VCPUOP_register_runstate_memory_area:
        return register_runstate_area(v, target, h->a3);
    case VCPUOP_set_periodic_timer: {
        struct vcpu_set_periodic_timer p;
        if (hv_copy_from_guest(v, &p, h->a3, sizeof(p)) < 0)
            return -XEN_EFAULT;
        if (p.period_ns < 1000000ULL)   /* below 1 ms */
            return -XEN_EINVAL;
        set_periodic(target, p.period_ns);
        return 0;
    }
    case VCPUOP_stop_periodic_timer:
        set_periodic(target, 0);
        return 0;
    case VCPUOP_set_singleshot_timer: {
        struct vcpu_set_singleshot_timer s;
        if (target != v)
            return -XEN_EINVAL;         /* only for the calling vCPU itself */
        if (hv_copy_from_guest(v, &s, h->a3, sizeof(s)) < 0)
            return -XEN_EFAULT;
        if ((s.flags & VCPU_SSHOTTMR_future) && s.timeout_abs_ns < hv_system_time())
            return -XEN_ETIME;
        set_singleshot(v, s.timeout_abs_ns);
        return 0;
    }
    case VCPUOP_stop_singleshot_timer:
        if (target != v)
            return -XEN_EINVAL;
        set_singleshot(v, 0);
        return 0;
    case VCPUOP_register_vcpu_info:
        return register_vcpu_info(v, target, h->a3);
    default:
        return -XEN_ENOSYS;
    }
}
