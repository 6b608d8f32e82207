/*
 * timers.c - the timer service: system time, the PV clock, one-shot and periodic timers.
 *
 * System time is the host's CLOCK_MONOTONIC in ns, the same for every domain. Each
 * vCPU's vcpu_time_info lets the guest compute it from rdtsc with no exit:
 * now = system_time + ((rdtsc - tsc_timestamp) << shift) * mul >> 32.
 * One thread per domain sleeps until the earliest deadline of any vCPU, then makes
 * VIRQ_TIMER pending, which wakes a blocked vCPU or kicks a running one.
 */
#include <errno.h>
#include <string.h>
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

/* ---- the timer thread ---- */

static void fire(struct hv_vcpu *v)
{
    hv_pvclock_update(v);
    if (hv_send_virq(v->dom, (uint32_t)v->id, VIRQ_TIMER) == 0)
        v->timers.fired++;
}

static void *timer_main(void *arg)
{
    struct hv_domain *d = arg;

    pthread_mutex_lock(&d->timer_lock);
    while (!d->timer_stop) {
        uint64_t now = hv_system_time(), next = HV_NO_DEADLINE;
        struct hv_vcpu *due[HV_MAX_VCPUS];
        int ndue = 0;

        for (int i = 0; i < HV_MAX_VCPUS; i++) {
            struct hv_vcpu *v = d->vcpus[i];
            struct hv_vcpu_timers *t;
            int expired = 0;
            if (!v)
                continue;
            t = &v->timers;
            if (t->singleshot && t->singleshot <= now) {
                t->singleshot = 0;
                expired = 1;
            }
            if (t->period && t->next_periodic <= now) {
                t->next_periodic += t->period;
                if (t->next_periodic <= now)    /* we fell behind: skip, don't burst */
                    t->next_periodic = now + t->period;
                expired = 1;
            }
            if (expired)
                due[ndue++] = v;
            if (t->singleshot && t->singleshot < next)
                next = t->singleshot;
            if (t->period && t->next_periodic < next)
                next = t->next_periodic;
        }
        if (ndue) {
            /* Raise outside timer_lock: the event path takes other locks. */
            pthread_mutex_unlock(&d->timer_lock);
            for (int i = 0; i < ndue; i++)
                fire(due[i]);
            pthread_mutex_lock(&d->timer_lock);
            continue;
        }
        /* A native domain's PIT keeps its own deadline (devices.c raises what is due). */
        {
            uint64_t device_next = hv_devices_timer(d);
            if (device_next < next)
                next = device_next;
        }
        if (next == HV_NO_DEADLINE) {
            pthread_cond_wait(&d->timer_cond, &d->timer_lock);
        } else {
            struct timespec ts = { .tv_sec = (time_t)(next / 1000000000ULL),
                                   .tv_nsec = (long)(next % 1000000000ULL) };
            pthread_cond_timedwait(&d->timer_cond, &d->timer_lock, &ts);
        }
    }
    pthread_mutex_unlock(&d->timer_lock);
    return NULL;
}

int hv_timers_start(struct hv_domain *d, char *err, int err_len)
{
    pthread_condattr_t attr;
    int rc;

    pthread_mutex_init(&d->timer_lock, NULL);
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);  /* deadlines are system time */
    pthread_cond_init(&d->timer_cond, &attr);
    pthread_condattr_destroy(&attr);
    rc = pthread_create(&d->timer_thread, NULL, timer_main, d);
    if (rc) {
        hv_set_error(err, err_len, "cannot start the timer thread: %s", strerror(rc));
        return -1;
    }
    d->timer_thread_started = 1;
    return 0;
}

void hv_timers_stop(struct hv_domain *d)
{
    if (!d->timer_thread_started)
        return;
    pthread_mutex_lock(&d->timer_lock);
    d->timer_stop = 1;
    pthread_cond_signal(&d->timer_cond);
    pthread_mutex_unlock(&d->timer_lock);
    pthread_join(d->timer_thread, NULL);
    d->timer_thread_started = 0;
    pthread_cond_destroy(&d->timer_cond);
    pthread_mutex_destroy(&d->timer_lock);
}

static void set_singleshot(struct hv_vcpu *v, uint64_t deadline)
{
    struct hv_domain *d = v->dom;
    pthread_mutex_lock(&d->timer_lock);
    v->timers.singleshot = deadline;
    pthread_cond_signal(&d->timer_cond);
    pthread_mutex_unlock(&d->timer_lock);
}

static void set_periodic(struct hv_vcpu *v, uint64_t period)
{
    struct hv_domain *d = v->dom;
    pthread_mutex_lock(&d->timer_lock);
    v->timers.period = period;
    v->timers.next_periodic = period ? hv_system_time() + period : 0;
    pthread_cond_signal(&d->timer_cond);
    pthread_mutex_unlock(&d->timer_lock);
}

/* ---- hypercalls ---- */

int64_t do_set_timer_op(struct hv_vcpu *v, const struct hv_hcall *h)
{
    /* 0 stops the timer; a time already past fires at once (the thread sees it due). */
    set_singleshot(v, h->a1);
    return 0;
}

static int64_t runstate_info(struct hv_vcpu *v, uint64_t arg)
{
    struct vcpu_runstate_info r;
    memset(&r, 0, sizeof(r));
    r.state = RUNSTATE_running;         /* it is running: it is making this call */
    r.state_entry_time = hv_system_time();
    r.time[RUNSTATE_running] = hv_system_time() - v->dom->boot_system_time;
    return hv_copy_to_guest(v, arg, &r, sizeof(r)) < 0 ? -XEN_EFAULT : 0;
}

static int64_t register_vcpu_info(struct hv_vcpu *v, uint64_t arg)
{
    struct vcpu_register_vcpu_info r;
    uint64_t gpa;

    if (hv_copy_from_guest(v, &r, arg, sizeof(r)) < 0)
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
    case VCPUOP_is_up:
        return 1;
    case VCPUOP_up:
        return 0;                       /* already up */
    case VCPUOP_initialise:
        return -XEN_EEXIST;             /* every vCPU is initialised by the builder */
    case VCPUOP_get_runstate_info:
        return runstate_info(target, h->a3);
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
        return register_vcpu_info(target, h->a3);
    default:
        return -XEN_ENOSYS;
    }
}
