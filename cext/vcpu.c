/*
 * vcpu.c - what every engine's vCPU shares: creation, the run wrapper (thread and CPU
 * time bookkeeping), kick, pause and state, and the choice of the next interrupt.
 */
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hv.h"

struct hv_vcpu *hv_vcpu_create(struct hv_domain *d, int id, char *err, int err_len)
{
    struct hv_vcpu *v;

    if (id < 0 || id >= HV_MAX_VCPUS || d->vcpus[id]) {
        hv_set_error(err, err_len, "bad or duplicate vCPU id %d", id);
        return NULL;
    }
    v = calloc(1, sizeof(*v));
    if (!v) {
        hv_set_error(err, err_len, "out of host memory");
        return NULL;
    }
    v->dom = d;
    v->id = id;
    v->vcpu_info_gpa = HV_NO_PAGE;
    v->thread = pthread_self();
    pthread_mutex_init(&v->kick_lock, NULL);
    pthread_mutex_init(&v->wait_lock, NULL);
    pthread_cond_init(&v->wait_cond, NULL);
    pthread_mutex_init(&v->time_lock, NULL);
    /* Visible to the services before the engine part runs: the PV clock needs it. */
    d->vcpus[id] = v;
    if (d->engine->vcpu_create(v, err, err_len) < 0) {
        d->vcpus[id] = NULL;
        pthread_mutex_destroy(&v->kick_lock);
        pthread_mutex_destroy(&v->wait_lock);
        pthread_cond_destroy(&v->wait_cond);
        pthread_mutex_destroy(&v->time_lock);
        free(v);
        return NULL;
    }
    return v;
}

void hv_vcpu_destroy(struct hv_vcpu *v)
{
    v->dom->engine->vcpu_destroy(v);
    v->dom->vcpus[v->id] = NULL;
    pthread_mutex_destroy(&v->kick_lock);
    pthread_mutex_destroy(&v->wait_lock);
    pthread_cond_destroy(&v->wait_cond);
    pthread_mutex_destroy(&v->time_lock);
    free(v);
}

int hv_vcpu_set_boot_state(struct hv_vcpu *v, const struct hv_boot_state *bs, char *err, int err_len)
{
    return v->dom->engine->set_boot_state(v, bs, err, err_len);
}

int hv_stop_with(struct hv_stop *stop, int reason, int code, uint64_t rip, const char *fmt, ...)
{
    va_list ap;
    stop->reason = reason;
    stop->code = code;
    stop->rip = rip;
    va_start(ap, fmt);
    vsnprintf(stop->message, sizeof(stop->message), fmt, ap);
    va_end(ap);
    return reason;
}

/* The vector the vCPU should take next: the PV upcall, else a device interrupt. */
int hv_next_vector(struct hv_vcpu *v, int *is_upcall)
{
    *is_upcall = hv_upcall_wanted(v);
    if (*is_upcall)
        return v->dom->callback_vector;
    return v->dom->devices ? hv_devices_irq_vector(v->dom) : -1;
}

int hv_interrupt_due(struct hv_vcpu *v, void *unused)
{
    int is_upcall;
    return hv_next_vector(v, &is_upcall) >= 0;
}

int hv_vcpu_not_paused(struct hv_vcpu *v, void *unused)
{
    return !__atomic_load_n(&v->paused, __ATOMIC_ACQUIRE);
}

int hv_vcpu_run(struct hv_vcpu *v, struct hv_stop *stop)
{
    uint64_t t0 = hv_now_ns();
    int rc;

    memset(stop, 0, sizeof(*stop));
    pthread_mutex_lock(&v->kick_lock);
    v->thread = pthread_self();
    v->in_run = 1;
    pthread_mutex_unlock(&v->kick_lock);

    rc = v->dom->engine->run(v, stop);

    pthread_mutex_lock(&v->kick_lock);
    v->in_run = 0;
    {
        struct timespec ts;
        if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) == 0)
            v->cpu_ns_at_stop = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    }
    pthread_mutex_unlock(&v->kick_lock);
    stop->elapsed_ns = hv_now_ns() - t0;
    return rc;
}

void hv_vcpu_pause(struct hv_vcpu *v, int paused)
{
    __atomic_store_n(&v->paused, paused ? 1 : 0, __ATOMIC_SEQ_CST);
    hv_vcpu_notify(v);                  /* out of the guest to sleep, or awake to go on */
}

int hv_vcpu_state(struct hv_vcpu *v)
{
    int state;
    pthread_mutex_lock(&v->kick_lock);
    if (!v->in_run)
        state = HV_VCPU_STOPPED;
    else if (__atomic_load_n(&v->paused, __ATOMIC_ACQUIRE))
        state = HV_VCPU_PAUSED;
    else if (__atomic_load_n(&v->waiting, __ATOMIC_ACQUIRE))
        state = HV_VCPU_BLOCKED;
    else
        state = HV_VCPU_RUNNING;
    pthread_mutex_unlock(&v->kick_lock);
    return state;
}

uint64_t hv_vcpu_cpu_ns(struct hv_vcpu *v)
{
    uint64_t ns = v->cpu_ns_at_stop;
    pthread_mutex_lock(&v->kick_lock);
    if (v->in_run) {
        clockid_t clock;
        struct timespec ts;
        if (pthread_getcpuclockid(v->thread, &clock) == 0 && clock_gettime(clock, &ts) == 0)
            ns = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
    }
    pthread_mutex_unlock(&v->kick_lock);
    return ns;
}

void hv_vcpu_kick(struct hv_vcpu *v)
{
    __atomic_store_n(&v->kicked, 1, __ATOMIC_SEQ_CST);
    hv_vcpu_notify(v);                  /* wakes it from block/poll/hlt, or kicks it out */
}
