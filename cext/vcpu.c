/*
 * vcpu.c - what every engine's vCPU shares: creation, the scheduler that runs vCPUs on
 * worker threads, parking and waking, kick, pause and state, and the choice of the
 * next interrupt.
 *
 * A vCPU is not a thread. Started vCPUs that can run wait in one run queue; worker
 * threads take them and call the engine's run, which returns when the vCPU stops for
 * good or must wait (SCHEDOP_block or poll, hlt, a pause: HV_STOP_PARKED). A waiting
 * vCPU is parked and holds no thread; whatever it waits for (an event, an interrupt,
 * a deadline, the toolstack) calls hv_vcpu_notify, which puts it back in the queue.
 * A worker that finds no work for a while ends, so the process has about as many
 * threads as vCPUs running at once: a thousand blocked domains cost no thread at all.
 *
 * Lock order: a vCPU's wait_lock, then rq_lock; ev_lock is taken before wait_lock
 * (events.c raises, then notifies), never while it is held.
 */
#include <errno.h>
#include <linux/membarrier.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>

#include "hv.h"

#define WORKER_IDLE_NS (2 * 1000000000ULL)  /* a worker with no work this long ends */

static uint64_t thread_cpu_ns(void)
{
    struct timespec ts;
    if (clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts) < 0)
        return 0;
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

/* ---- creation ---- */

struct hv_vcpu *hv_vcpu_create(struct hv_domain *d, int id, char *err, int err_len)
{
    struct hv_vcpu *v;

    if (id < 0 || (uint32_t)id >= d->max_vcpus || d->vcpus[id]) {
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
    v->runstate_gpa = HV_NO_PAGE;
    v->base_mfn = HV_NO_FRAME;
    v->down = 1;                        /* until the builder or VCPUOP_initialise + up */
    /* Xen's vCPUs are offline until they first run; vCPU 0's accounting starts with its
     * first slice, the others' now */
    v->runstate.state = RUNSTATE_offline;
    if (id)
        v->runstate.state_entry_time = hv_system_time();
    v->sched_state = HV_SCHED_NEW;
    /* Only a worker inside the engine's run is the vCPU's thread; none is before. */
    memset(&v->thread, 0, sizeof(v->thread));
    pthread_mutex_init(&v->kick_lock, NULL);
    pthread_mutex_init(&v->wait_lock, NULL);
    pthread_cond_init(&v->done_cond, NULL);
    pthread_mutex_init(&v->time_lock, NULL);
    /* Xen gives every PVH vCPU an emulated local APIC */
    if (d->guest_type == HV_GUEST_PVH && hv_lapic_init(v) < 0) {
        hv_set_error(err, err_len, "out of host memory");
        free(v);
        return NULL;
    }
    /* Visible to the services before the engine part runs: the PV clock needs it. */
    d->vcpus[id] = v;
    /* vCPU 0 runs from the start; another needs its engine part (a KVM vCPU, or a
     * whole Unicorn instance of some megabytes) only once VCPUOP_initialise gives it
     * a context to run (hv_vcpu_engine_ready) */
    if (id > 0)
        return v;
    if (hv_vcpu_engine_ready(v, err, err_len) < 0) {
        d->vcpus[id] = NULL;
        hv_lapic_destroy(v);
        pthread_mutex_destroy(&v->kick_lock);
        pthread_mutex_destroy(&v->wait_lock);
        pthread_cond_destroy(&v->done_cond);
        pthread_mutex_destroy(&v->time_lock);
        free(v);
        return NULL;
    }
    return v;
}

int hv_vcpu_engine_ready(struct hv_vcpu *v, char *err, int err_len)
{
    if (v->engine_ready)
        return 0;
    if (v->dom->engine->vcpu_create(v, err, err_len) < 0)
        return -1;
    v->engine_ready = 1;
    return 0;
}

/* Stops the vCPU if it was started and waits until no worker touches it. */
void hv_vcpu_destroy(struct hv_vcpu *v)
{
    pthread_mutex_lock(&v->wait_lock);
    if (v->sched_state != HV_SCHED_NEW && v->sched_state != HV_SCHED_DONE) {
        pthread_mutex_unlock(&v->wait_lock);
        hv_vcpu_kick(v);
        pthread_mutex_lock(&v->wait_lock);
        while (v->sched_state != HV_SCHED_DONE)
            pthread_cond_wait(&v->done_cond, &v->wait_lock);
    }
    pthread_mutex_unlock(&v->wait_lock);
    if (v->engine_ready)
        v->dom->engine->vcpu_destroy(v);
    v->dom->vcpus[v->id] = NULL;
    hv_lapic_destroy(v);
    pthread_mutex_destroy(&v->kick_lock);
    pthread_mutex_destroy(&v->wait_lock);
    pthread_cond_destroy(&v->done_cond);
    pthread_mutex_destroy(&v->time_lock);
    free(v);
}

/* The builder's start of day: the vCPU is initialised and up (Xen's vCPU 0). */
int hv_vcpu_set_boot_state(struct hv_vcpu *v, const struct hv_boot_state *bs, char *err, int err_len)
{
    int rc = v->dom->engine->set_boot_state(v, bs, err, err_len);
    if (rc == 0) {
        pthread_mutex_lock(&v->dom->vcpu_lock);
        v->initialised = 1;
        v->down = 0;
        pthread_mutex_unlock(&v->dom->vcpu_lock);
    }
    return rc;
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

/* ---- interrupts ---- */

/* The vector the vCPU should take next: the domain-wide upcall vector (injected
 * directly, as Xen does for HVM_PARAM_CALLBACK_IRQ), else its local APIC's (PVH), else
 * a device interrupt (native). */
int hv_next_vector(struct hv_vcpu *v, int *is_upcall)
{
    *is_upcall = hv_upcall_wanted(v);
    if (*is_upcall)
        return v->dom->callback_vector;
    if (v->lapic)
        return hv_lapic_pending(v);
    return v->dom->devices ? hv_devices_irq_vector(v->dom) : -1;
}

/* The engine injected what hv_next_vector said. */
void hv_vector_taken(struct hv_vcpu *v, int vector, int is_upcall)
{
    if (is_upcall)
        v->dom->counters.upcalls++;
    else if (v->lapic)
        hv_lapic_accept(v, vector);
    else
        hv_devices_irq_injected(v->dom, vector);
}

int hv_interrupt_due(struct hv_vcpu *v, void *unused)
{
    int is_upcall;
    return hv_next_vector(v, &is_upcall) >= 0;
}

/* ---- parking ---- */

void hv_vcpu_park(struct hv_vcpu *v, int kind, uint64_t deadline)
{
    v->park_kind = kind;
    v->park_expired = 0;
    hv_timers_set_wait(v, deadline);
}

static int poll_port_pending(struct hv_vcpu *v)
{
    for (uint32_t i = 0; i < v->poll.n; i++)
        if (hv_port_pending(v->dom, v->poll.ports[i]))
            return 1;
    return 0;
}

/* Caller holds wait_lock: may the parked vCPU go on? */
static int can_go_on(struct hv_vcpu *v)
{
    if (__atomic_load_n(&v->kicked, __ATOMIC_ACQUIRE) ||
        __atomic_load_n(&v->dom->shutting_down, __ATOMIC_ACQUIRE))
        return 1;
    switch (v->park_kind) {
    case HV_WAIT_UPCALL:
        /* A PVH vCPU blocks as an HVM one does in Xen: any interrupt its local APIC
         * raises wakes it (vlapic_set_irq kicks the vCPU), not only an event upcall. */
        return __atomic_load_n(&hv_vcpu_info(v)->evtchn_upcall_pending, __ATOMIC_ACQUIRE) ||
               (v->lapic && hv_lapic_pending(v) >= 0);
    case HV_WAIT_POLL:
        return poll_port_pending(v) || __atomic_load_n(&v->park_expired, __ATOMIC_ACQUIRE) ||
               (v->park_deadline && hv_system_time() >= v->park_deadline);
    case HV_WAIT_INTERRUPT:
        return hv_interrupt_due(v, NULL);
    case HV_WAIT_UNPAUSE:
        return !__atomic_load_n(&v->paused, __ATOMIC_ACQUIRE);
    case HV_WAIT_UP:
        return !__atomic_load_n(&v->down, __ATOMIC_ACQUIRE);
    default:
        return 1;
    }
}

/* ---- the run queue and its workers ---- */

struct worker {
    pthread_cond_t cond;
    struct worker *next_idle;   /* on idle_workers; on spare_workers once its thread ended */
    int woken;
};

static pthread_mutex_t rq_lock = PTHREAD_MUTEX_INITIALIZER;
static struct hv_vcpu *rq_head, *rq_tail;
static struct worker *idle_workers;     /* most recently idle first: its caches are warm */
/* Those of ended threads, never freed: a wake signalled after its waker let go of
 * rq_lock (below) may reach one late, and must find a condition variable there. */
static struct worker *spare_workers;
static int nr_workers;

static void *worker_main(void *arg);

/* Caller holds rq_lock. */
static void spawn_worker(void)
{
    pthread_t t;
    struct worker *w = spare_workers;
    if (w) {
        spare_workers = w->next_idle;
    } else {
        pthread_condattr_t attr;
        if (!(w = calloc(1, sizeof(*w))))
            return;             /* the vCPU stays queued for a worker that is busy now */
        pthread_condattr_init(&attr);
        pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
        pthread_cond_init(&w->cond, &attr);
        pthread_condattr_destroy(&attr);
    }
    w->woken = 0;
    if (pthread_create(&t, NULL, worker_main, w) != 0) {
        w->next_idle = spare_workers;
        spare_workers = w;
        return;
    }
    pthread_detach(t);
    nr_workers++;
}

/* ---- wakes signalled once the waker's locks are let go ----
 *
 * A worker signalled while its waker still holds what the worker takes next (rq_lock, the
 * vCPU's wait_lock, the domain's ev_lock) often runs at once on the waker's core (the
 * other one busy), blocks on that lock and hands the core back: the two threads pass it
 * to and fro. On the block bench under load (load average 3.7 to 4.5 on this 2-core
 * host, 12 runs per engine), signalled under the locks, the worker switched out about 4
 * times (bt) and 3 times (kvm) per sleep of the guest and the backend's thread was
 * preempted as often per event it sent; signalled after them, about once each. So, as
 * Linux's wake_q: between hv_wakes_hold and the matching hv_wakes_release, rq_push only
 * notes the worker, and the last release signals it, after the caller let its locks go.
 * A worker noted here is one rq_push took off idle_workers and set woken, so it cannot
 * end meanwhile; a late signal is harmless (it checks woken). Past WAKES_DUE_MAX the
 * wake is signalled at once, as before. */
#define WAKES_DUE_MAX 8
static __thread int wakes_held;
static __thread int nr_wakes_due;
static __thread struct worker *wakes_due[WAKES_DUE_MAX];

void hv_wakes_hold(void)
{
    wakes_held++;
}

void hv_wakes_release(void)
{
    if (--wakes_held > 0)
        return;
    for (int i = 0; i < nr_wakes_due; i++)
        pthread_cond_signal(&wakes_due[i]->cond);
    nr_wakes_due = 0;
}

/* Queue a runnable vCPU; wake an idle worker (now, or at hv_wakes_release) or start one. */
static void rq_push(struct hv_vcpu *v)
{
    pthread_mutex_lock(&rq_lock);
    v->rq_next = NULL;
    if (rq_tail)
        rq_tail->rq_next = v;
    else
        rq_head = v;
    rq_tail = v;
    if (idle_workers) {
        struct worker *w = idle_workers;
        idle_workers = w->next_idle;
        w->woken = 1;
        if (wakes_held && nr_wakes_due < WAKES_DUE_MAX)
            wakes_due[nr_wakes_due++] = w;
        else
            pthread_cond_signal(&w->cond);
    } else {
        spawn_worker();
    }
    pthread_mutex_unlock(&rq_lock);
}

int hv_sched_workers(void)
{
    int n;
    pthread_mutex_lock(&rq_lock);
    n = nr_workers;
    pthread_mutex_unlock(&rq_lock);
    return n;
}

static void slice_begin(struct hv_vcpu *v)
{
    pthread_mutex_lock(&v->kick_lock);
    if (!v->started_ns)
        v->started_ns = hv_now_ns();    /* elapsed time counts from the first slice */
    v->thread = pthread_self();
    __atomic_store_n(&v->in_run, 1, __ATOMIC_SEQ_CST);
    v->slice_cpu_start = thread_cpu_ns();
    pthread_mutex_unlock(&v->kick_lock);
}

static void slice_end(struct hv_vcpu *v)
{
    pthread_mutex_lock(&v->kick_lock);
    __atomic_store_n(&v->in_run, 0, __ATOMIC_SEQ_CST);
    v->cpu_ns += thread_cpu_ns() - v->slice_cpu_start;
    memset(&v->thread, 0, sizeof(v->thread));
    pthread_mutex_unlock(&v->kick_lock);
}

/* The vCPU stopped for good. The first vCPU to stop gives the domain its reason and
 * stops the others (a fault, a kick, an error: Xen's domain_crash and destroy stop every
 * vCPU; a shutdown stops them by itself); the last one to stop makes that reason the
 * domain's and ends the console stream, once. Then destroy may go on: after the last
 * line nothing here touches v, the domain may be freed at once. */
static void finish(struct hv_vcpu *v, int rc, struct hv_stop *stop)
{
    struct hv_domain *d = v->dom;
    int first, last;

    stop->elapsed_ns = hv_now_ns() - d->vcpus[0]->started_ns;
    pthread_mutex_lock(&d->vcpu_lock);
    first = !d->stopping;
    if (first) {
        d->stopping = 1;
        d->final_stop = *stop;
        d->result = rc;
    }
    last = --d->live_vcpus == 0;
    if (last)
        __atomic_store_n(&d->result_ready, 1, __ATOMIC_RELEASE);
    pthread_mutex_unlock(&d->vcpu_lock);
    if (first)
        for (int i = 0; i < HV_MAX_VCPUS; i++)
            if (d->vcpus[i] && d->vcpus[i] != v) {
                __atomic_store_n(&d->vcpus[i]->kicked, 1, __ATOMIC_SEQ_CST);
                hv_vcpu_notify(d->vcpus[i]);
            }
    if (last)
        hv_console_close(d);            /* end of file: whoever reads the console knows */
    pthread_mutex_lock(&v->wait_lock);
    v->sched_state = HV_SCHED_DONE;
    hv_runstate_enter(v, RUNSTATE_offline);
    pthread_cond_broadcast(&v->done_cond);
    pthread_mutex_unlock(&v->wait_lock);
}

/* Run v until it parks or stops for good. */
static void run_vcpu(struct hv_vcpu *v)
{
    struct hv_stop stop;

    for (;;) {
        int rc;
        if (v->park_kind != HV_WAIT_NONE) {
            /* events other threads deferred count before we decide (the guest is stopped) */
            hv_events_flush(v);
            pthread_mutex_lock(&v->wait_lock);
            if (!can_go_on(v)) {
                if (__atomic_load_n(&v->deferred_events, __ATOMIC_ACQUIRE)) {
                    pthread_mutex_unlock(&v->wait_lock);
                    continue;           /* more arrived meanwhile: apply them, look again */
                }
                v->sched_state = HV_SCHED_PARKED;
                v->waiting = 1;
                hv_runstate_enter(v, RUNSTATE_blocked);
                pthread_mutex_unlock(&v->wait_lock);
                hv_runstate_publish(v, 0);
                return;
            }
            v->park_kind = HV_WAIT_NONE;
            pthread_mutex_unlock(&v->wait_lock);
            hv_timers_set_wait(v, 0);
        }
        memset(&stop, 0, sizeof(stop));
        slice_begin(v);
        rc = v->dom->engine->run(v, &stop);
        slice_end(v);
        if (rc != HV_STOP_PARKED) {
            finish(v, rc, &stop);
            return;
        }
    }
}

static void *worker_main(void *arg)
{
    struct worker *w = arg;

    prctl(PR_SET_NAME, "vcpu worker");  /* what top, perf and /proc/PID/task call it */
    pthread_mutex_lock(&rq_lock);
    for (;;) {
        struct hv_vcpu *v = rq_head;
        if (v) {
            rq_head = v->rq_next;
            if (!rq_head)
                rq_tail = NULL;
            pthread_mutex_unlock(&rq_lock);
            pthread_mutex_lock(&v->wait_lock);
            v->sched_state = HV_SCHED_RUNNING;
            hv_runstate_enter(v, RUNSTATE_running);
            pthread_mutex_unlock(&v->wait_lock);
            hv_runstate_publish(v, 1);
            run_vcpu(v);
            pthread_mutex_lock(&rq_lock);
            continue;
        }
        /* idle: wait for work on our own condition, or end */
        struct timespec ts;
        uint64_t until;
        clock_gettime(CLOCK_MONOTONIC, &ts);
        until = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec + WORKER_IDLE_NS;
        ts.tv_sec = (time_t)(until / 1000000000ULL);
        ts.tv_nsec = (long)(until % 1000000000ULL);
        w->woken = 0;
        w->next_idle = idle_workers;
        idle_workers = w;
        while (!w->woken)
            if (pthread_cond_timedwait(&w->cond, &rq_lock, &ts) == ETIMEDOUT)
                break;
        if (!w->woken) {
            for (struct worker **p = &idle_workers; *p; p = &(*p)->next_idle)
                if (*p == w) {
                    *p = w->next_idle;
                    break;
                }
            if (!rq_head) {
                nr_workers--;
                w->next_idle = spare_workers;
                spare_workers = w;
                pthread_mutex_unlock(&rq_lock);
                return NULL;
            }
        }
    }
}

/* ---- what the toolstack and the services call ---- */

/* Caller holds d->vcpu_lock. */
static int start_locked(struct hv_vcpu *v)
{
    struct hv_domain *d = v->dom;

    if (d->stopping)
        return -1;                      /* the domain is ending: no new vCPU runs */
    pthread_mutex_lock(&v->wait_lock);
    if (v->sched_state != HV_SCHED_NEW) {
        pthread_mutex_unlock(&v->wait_lock);
        return -1;
    }
    d->live_vcpus++;
    v->sched_state = HV_SCHED_RUNNABLE;
    hv_runstate_enter(v, RUNSTATE_runnable);
    rq_push(v);
    pthread_mutex_unlock(&v->wait_lock);
    return 0;
}

int hv_vcpu_start(struct hv_vcpu *v)
{
    int rc;
    hv_wakes_hold();
    pthread_mutex_lock(&v->dom->vcpu_lock);
    rc = start_locked(v);
    pthread_mutex_unlock(&v->dom->vcpu_lock);
    hv_wakes_release();
    return rc;
}

/* Caller holds d->vcpu_lock (vcpu_op.c's VCPUOP_up). A vCPU that ran before and went
 * down goes on where it stopped, as in Xen; one that never ran loads its context first. */
int hv_vcpu_bring_up(struct hv_vcpu *t)
{
    if (t->sched_state == HV_SCHED_NEW) {
        t->context_pending = 1;
        t->down = 0;
        if (start_locked(t) < 0) {
            t->down = 1;
            return -1;
        }
        return 0;
    }
    t->down = 0;
    hv_vcpu_notify(t);
    return 0;
}

/* ---- the guest lock ----
 *
 * On an engine whose locked instructions are not atomic against another host thread
 * (bt), two vCPUs of a domain running guest code at once would lose each other's
 * updates of a spinlock or an event word. So one runs at a time, as QEMU's
 * single-threaded TCG runs its vCPUs in turn: the engine holds the domain's guest lock
 * while it runs guest code and while it handles what the guest did, and hands it over
 * when another vCPU waits (the engine's slice check) or when it parks. Tickets make the
 * hand-over fair: the releasing vCPU queues behind the one that waited. A thread holds
 * at most one domain's guest lock (only that domain's vCPU threads take it). */
static __thread struct hv_domain *guest_lock_dom;
static __thread int guest_lock_depth;

void hv_guest_lock(struct hv_domain *d)
{
    uint64_t ticket;
    if (guest_lock_dom == d) {
        guest_lock_depth++;
        return;
    }
    pthread_mutex_lock(&d->guest_mutex);
    ticket = d->guest_next++;
    __atomic_add_fetch(&d->guest_waiters, 1, __ATOMIC_SEQ_CST);
    while (ticket != d->guest_serving)
        pthread_cond_wait(&d->guest_cond, &d->guest_mutex);
    __atomic_sub_fetch(&d->guest_waiters, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&d->guest_mutex);
    guest_lock_dom = d;
    guest_lock_depth = 1;
}

void hv_guest_unlock(struct hv_domain *d)
{
    if (--guest_lock_depth > 0)
        return;
    guest_lock_dom = NULL;
    pthread_mutex_lock(&d->guest_mutex);
    d->guest_serving++;
    pthread_cond_broadcast(&d->guest_cond);
    pthread_mutex_unlock(&d->guest_mutex);
}

int hv_guest_lock_held(struct hv_domain *d)
{
    return guest_lock_dom == d;
}

int hv_guest_lock_yield(struct hv_domain *d)
{
    int depth = guest_lock_depth;
    if (!__atomic_load_n(&d->guest_waiters, __ATOMIC_SEQ_CST))
        return 0;
    guest_lock_depth = 1;
    hv_guest_unlock(d);
    hv_guest_lock(d);
    guest_lock_depth = depth;
    return 1;
}

/* ---- ordering against the guest's own accesses ----
 *
 * io/ring.h's event suppression is Dekker's handshake: the frontend stores req_prod and,
 * after a full barrier, loads req_event; the backend stores req_event and, after its
 * full barrier, loads req_prod (and the same with rsp_prod and rsp_event the other way).
 * One of the two must see the other's store, or the backend sleeps on a request nobody
 * announces. On bt the guest's barrier is not there: Unicorn's TCG translates mfence and
 * the lock prefix without a host fence, so the host CPU lets the guest's load pass its
 * own store still in the store buffer, and both ends read the old values. (A guest's
 * store, mfence, load in Unicorn against a host thread's store, fence, load, on this
 * project's EPYC host: both loads old in 311 and in 2,015 of 200,000 tries; with
 * membarrier instead of the host's fence, in none of 20,000.) membarrier(2) is the other
 * half of an asymmetric barrier: before it returns, every thread of this process running
 * on a CPU has executed a full barrier, so either the guest's store came before that
 * barrier and our load after membarrier sees it, or the guest's load comes after it and
 * sees our store. Registered once per process; without it (a kernel before 4.14, or a
 * sandbox refusing it) only our own fence remains, and a line on stderr says so. */
static pthread_once_t membarrier_once = PTHREAD_ONCE_INIT;
static int membarrier_ready;

static void membarrier_register(void)
{
    membarrier_ready = syscall(__NR_membarrier, MEMBARRIER_CMD_REGISTER_PRIVATE_EXPEDITED,
                               0, 0) == 0;
    if (!membarrier_ready)
        fprintf(stderr, "trapless: membarrier(2) is not available (%s): a bt guest's ring "
                "barriers are not enforced against trapless's backends\n", strerror(errno));
}

void hv_guest_barrier(struct hv_domain *d)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (d->engine->guest_fences)
        return;
    pthread_once(&membarrier_once, membarrier_register);
    if (membarrier_ready)
        syscall(__NR_membarrier, MEMBARRIER_CMD_PRIVATE_EXPEDITED, 0, 0);
}

/* The domain's end: what the first vCPU to stop said, once every vCPU has stopped. */
int hv_vcpu_result(struct hv_vcpu *v, struct hv_stop *stop)
{
    struct hv_domain *d = v->dom;
    if (!__atomic_load_n(&d->result_ready, __ATOMIC_ACQUIRE))
        return -1;
    *stop = d->final_stop;
    return d->result;
}

int hv_vcpu_before_entry(struct hv_vcpu *v, int (*flush)(struct hv_vcpu *v))
{
    if (__atomic_load_n(&v->down, __ATOMIC_ACQUIRE)) {
        hv_vcpu_park(v, HV_WAIT_UP, 0);
        return 1;
    }
    /* in_guest before flush_wanted, as hv_vcpu_flush_others sets them the other way
     * round: either it sees us in the guest and waits, or we see its request */
    __atomic_store_n(&v->in_guest, 1, __ATOMIC_SEQ_CST);
    if (__atomic_exchange_n(&v->flush_wanted, 0, __ATOMIC_SEQ_CST) && flush(v) < 0) {
        __atomic_store_n(&v->in_guest, 0, __ATOMIC_SEQ_CST);
        return -1;
    }
    return 0;
}

int hv_vcpu_flush_others(struct hv_vcpu *v)
{
    struct hv_domain *d = v->dom;

    for (uint32_t i = 0; i < d->max_vcpus; i++) {
        struct hv_vcpu *t = d->vcpus[i];
        if (!t || t == v || !t->engine_ready)
            continue;                   /* no engine part: nothing cached */
        __atomic_store_n(&t->flush_wanted, 1, __ATOMIC_SEQ_CST);
        if (!__atomic_load_n(&t->in_guest, __ATOMIC_SEQ_CST))
            continue;                   /* it flushes before it enters again */
        /* out of the guest, then it flushes before entering again; a vCPU waiting for
         * our lock meanwhile is out of the guest too */
        t->ops->kick(t);
        while (__atomic_load_n(&t->in_guest, __ATOMIC_SEQ_CST) &&
               __atomic_load_n(&t->flush_wanted, __ATOMIC_SEQ_CST))
            sched_yield();
    }
    return 0;
}

void hv_vcpu_notify(struct hv_vcpu *v)
{
    int running;
    hv_wakes_hold();
    pthread_mutex_lock(&v->wait_lock);
    running = v->sched_state == HV_SCHED_RUNNING;
    if (v->sched_state == HV_SCHED_PARKED &&
        (can_go_on(v) || __atomic_load_n(&v->deferred_events, __ATOMIC_ACQUIRE))) {
        v->sched_state = HV_SCHED_RUNNABLE;
        v->waiting = 0;
        hv_runstate_enter(v, RUNSTATE_runnable);
        rq_push(v);
    }
    pthread_mutex_unlock(&v->wait_lock);
    hv_wakes_release();
    /* Inside the engine's run on another thread: out of the guest, so that its loop
     * looks again. Between two slices the loop looks anyway before it enters. */
    if (running && __atomic_load_n(&v->in_run, __ATOMIC_SEQ_CST) &&
        !pthread_equal(v->thread, pthread_self()))
        v->ops->kick(v);
}

/* A port went pending (Xen's evtchn_check_pollers): a vCPU parked in SCHEDOP_poll on it
 * goes on even if the port is masked, which is how a guest waits for one port without
 * taking upcalls. No kick: a vCPU in the guest polls nothing. */
void hv_vcpu_wake_poller(struct hv_vcpu *v)
{
    hv_wakes_hold();
    pthread_mutex_lock(&v->wait_lock);
    if (v->sched_state == HV_SCHED_PARKED && v->park_kind == HV_WAIT_POLL && can_go_on(v)) {
        v->sched_state = HV_SCHED_RUNNABLE;
        v->waiting = 0;
        hv_runstate_enter(v, RUNSTATE_runnable);
        rq_push(v);
    }
    pthread_mutex_unlock(&v->wait_lock);
    hv_wakes_release();
}

void hv_vcpu_deadline_passed(struct hv_vcpu *v)
{
    __atomic_store_n(&v->park_expired, 1, __ATOMIC_RELEASE);
    hv_vcpu_notify(v);
}

/* The toolstack pauses a domain: every vCPU of it (Xen's domain_pause). */
void hv_vcpu_pause(struct hv_vcpu *v, int paused)
{
    struct hv_domain *d = v->dom;
    for (uint32_t i = 0; i < d->max_vcpus; i++) {
        struct hv_vcpu *t = d->vcpus[i];
        if (!t)
            continue;
        __atomic_store_n(&t->paused, paused ? 1 : 0, __ATOMIC_SEQ_CST);
        hv_vcpu_notify(t);              /* out of the guest to park, or back to work */
    }
}

int hv_vcpu_state(struct hv_vcpu *v)
{
    int state;
    pthread_mutex_lock(&v->wait_lock);
    if (v->sched_state == HV_SCHED_NEW || v->sched_state == HV_SCHED_DONE ||
        __atomic_load_n(&v->dom->result_ready, __ATOMIC_ACQUIRE))
        state = HV_VCPU_STOPPED;
    else if (__atomic_load_n(&v->paused, __ATOMIC_ACQUIRE))
        state = HV_VCPU_PAUSED;
    else if (v->sched_state == HV_SCHED_PARKED)
        state = HV_VCPU_BLOCKED;
    else
        state = HV_VCPU_RUNNING;
    pthread_mutex_unlock(&v->wait_lock);
    return state;
}

uint64_t hv_vcpu_cpu_ns(struct hv_vcpu *v)
{
    uint64_t ns;
    pthread_mutex_lock(&v->kick_lock);
    ns = v->cpu_ns;
    if (v->in_run) {
        clockid_t clock;
        struct timespec ts;
        if (pthread_getcpuclockid(v->thread, &clock) == 0 && clock_gettime(clock, &ts) == 0) {
            uint64_t now = (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
            if (now > v->slice_cpu_start)
                ns += now - v->slice_cpu_start;
        }
    }
    pthread_mutex_unlock(&v->kick_lock);
    return ns;
}

void hv_vcpu_kick(struct hv_vcpu *v)
{
    __atomic_store_n(&v->kicked, 1, __ATOMIC_SEQ_CST);
    hv_vcpu_notify(v);                  /* wakes it if parked, or kicks it out */
}
