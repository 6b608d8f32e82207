/*
 * domain.c - a domain: its guest memory, counters and console; engine-independent.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <x86intrin.h>

#include "hv.h"

uint64_t hv_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

void hv_set_error(char *buf, int len, const char *fmt, ...)
{
    va_list ap;
    if (!buf || len <= 0)
        return;
    va_start(ap, fmt);
    vsnprintf(buf, (size_t)len, fmt, ap);
    va_end(ap);
}

/* ---- the host-wide memory budget ---- */

static pthread_mutex_t budget_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t budget_bytes, committed_bytes;
static uint32_t committed_domains;

void hv_set_memory_budget(uint64_t bytes)
{
    pthread_mutex_lock(&budget_lock);
    budget_bytes = bytes;
    pthread_mutex_unlock(&budget_lock);
}

uint64_t hv_memory_budget(void)
{
    return __atomic_load_n(&budget_bytes, __ATOMIC_ACQUIRE);
}

uint64_t hv_memory_committed(void)
{
    return __atomic_load_n(&committed_bytes, __ATOMIC_ACQUIRE);
}

/* Guest RAM is mapped with MAP_NORESERVE, so the kernel would accept any number of
 * domains and let the OOM killer sort it out once they touch their memory; the
 * budget refuses the domain that would not fit instead. */
static int budget_take(uint64_t bytes, char *err, int err_len)
{
    int ok;
    pthread_mutex_lock(&budget_lock);
    ok = !budget_bytes || (committed_bytes + bytes >= committed_bytes &&
                           committed_bytes + bytes <= budget_bytes);
    if (ok) {
        committed_bytes += bytes;
        committed_domains++;
    } else {
        hv_set_error(err, err_len, "%llu MiB would exceed the host memory budget: %llu of "
                     "%llu MiB are given to %u domain(s)",
                     (unsigned long long)(bytes >> 20), (unsigned long long)(committed_bytes >> 20),
                     (unsigned long long)(budget_bytes >> 20), committed_domains);
    }
    pthread_mutex_unlock(&budget_lock);
    return ok ? 0 : -1;
}

static void budget_give_back(uint64_t bytes)
{
    pthread_mutex_lock(&budget_lock);
    committed_bytes -= bytes;
    committed_domains--;
    pthread_mutex_unlock(&budget_lock);
}

static const struct hv_engine_impl *const engines[HV_ENGINE_NR] = {
    [HV_ENGINE_KVM] = &hv_kvm_engine,
    [HV_ENGINE_BT] = &hv_bt_engine,
};

/* Pages other domains or backends still map stay alive through their own mappings of
 * the file; only this domain's view goes. */
static void unmap_ram(struct hv_domain *d)
{
    munmap(d->ram, d->ram_bytes + d->gnt_bytes);
    close(d->ram_fd);
    budget_give_back(d->ram_bytes);
}

struct hv_domain *hv_domain_create(const struct hv_domain_config *cfg, char *err, int err_len)
{
    struct hv_domain *d;

    if (cfg->ram_bytes == 0 || cfg->ram_bytes % HV_PAGE_SIZE) {
        hv_set_error(err, err_len, "memory size %llu is not a whole number of pages",
                     (unsigned long long)cfg->ram_bytes);
        return NULL;
    }
    if (cfg->pt_pool_start > cfg->pt_pool_end || cfg->pt_pool_end > cfg->ram_bytes ||
        cfg->pt_pool_start % HV_PAGE_SIZE || cfg->pt_pool_end % HV_PAGE_SIZE) {
        hv_set_error(err, err_len, "page-table pool [%#llx, %#llx) is not inside guest memory",
                     (unsigned long long)cfg->pt_pool_start, (unsigned long long)cfg->pt_pool_end);
        return NULL;
    }
    if (cfg->max_vcpus > HV_MAX_VCPUS) {
        hv_set_error(err, err_len, "%u vCPUs: at most %d", cfg->max_vcpus, HV_MAX_VCPUS);
        return NULL;
    }
    if (budget_take(cfg->ram_bytes, err, err_len) < 0)
        return NULL;
    d = calloc(1, sizeof(*d));
    if (!d) {
        budget_give_back(cfg->ram_bytes);
        hv_set_error(err, err_len, "out of host memory");
        return NULL;
    }
    d->domid = cfg->domid;
    d->trace_tsc0 = __rdtsc();          /* the hypercall trace's time base (hypercall.c) */
    d->trace_ns0 = hv_now_ns();
    d->guest_type = cfg->guest_type;
    d->ram_bytes = cfg->ram_bytes;
    d->pt_pool_start = cfg->pt_pool_start;
    d->pt_pool_end = cfg->pt_pool_end;
    d->console_fd = cfg->console_fd;
    d->shutdown_code = -1;
    d->kvm_vm_fd = -1;
    d->max_vcpus = cfg->max_vcpus ? cfg->max_vcpus : 1;
    pthread_mutex_init(&d->vcpu_lock, NULL);
    {
        pthread_mutexattr_t recursive;      /* a multicall nests mm hypercalls */
        pthread_mutexattr_init(&recursive);
        pthread_mutexattr_settype(&recursive, PTHREAD_MUTEX_RECURSIVE);
        pthread_mutex_init(&d->mm_lock, &recursive);
        pthread_mutexattr_destroy(&recursive);
    }
    pthread_mutex_init(&d->guest_mutex, NULL);
    pthread_cond_init(&d->guest_cond, NULL);
    memcpy(d->handle, cfg->handle, sizeof(d->handle));
    pthread_mutex_init(&d->console_lock, NULL);

    /* Guest RAM and the grant region: a memory file, zero-filled, committed only as the
     * guest touches it; a file so one page can also be mapped elsewhere (grants). */
    d->gnt_bytes = HV_GNT_REGION_FRAMES * HV_PAGE_SIZE;
    d->ram_fd = memfd_create("trapless-guest-ram", MFD_CLOEXEC);
    if (d->ram_fd < 0 || ftruncate(d->ram_fd, (off_t)(d->ram_bytes + d->gnt_bytes)) < 0) {
        hv_set_error(err, err_len, "cannot create %llu bytes of guest memory: %s",
                     (unsigned long long)d->ram_bytes, strerror(errno));
        if (d->ram_fd >= 0)
            close(d->ram_fd);
        budget_give_back(d->ram_bytes);
        free(d);
        return NULL;
    }
    d->ram = mmap(NULL, d->ram_bytes + d->gnt_bytes, PROT_READ | PROT_WRITE,
                  MAP_SHARED | MAP_NORESERVE, d->ram_fd, 0);
    if (d->ram == MAP_FAILED) {
        hv_set_error(err, err_len, "cannot map %llu bytes of guest memory: %s",
                     (unsigned long long)d->ram_bytes, strerror(errno));
        close(d->ram_fd);
        budget_give_back(d->ram_bytes);
        free(d);
        return NULL;
    }
    if (cfg->engine < 0 || cfg->engine >= HV_ENGINE_NR || !engines[cfg->engine]) {
        hv_set_error(err, err_len, "unknown engine %d", cfg->engine);
        unmap_ram(d);
        free(d);
        return NULL;
    }
    d->engine = engines[cfg->engine];
    if (pv_domain_init(d, cfg->pv_model, err, err_len) < 0 ||   /* before the engine maps it */
        d->engine->create_vm(d, err, err_len) < 0) {
        pv_domain_destroy(d);
        unmap_ram(d);
        free(d);
        return NULL;
    }
    if (hv_gnt_init(d, err, err_len) < 0 ||
        hv_events_init(d, cfg->max_evtchn_ports, err, err_len) < 0 ||
        hv_timers_start(d, err, err_len) < 0) {
        hv_domain_destroy(d);
        return NULL;
    }
    return d;
}

int hv_domain_send_virq(struct hv_domain *d, uint32_t vcpu, uint32_t virq)
{
    return hv_send_virq(d, vcpu, virq);
}

void hv_domain_destroy(struct hv_domain *d)
{
    if (!d)
        return;
    hv_xs_detach(d);                    /* other domains' writes stop reaching its ring */
    hv_timers_stop(d);                  /* first: it touches vCPUs */
    for (int i = 0; i < HV_MAX_VCPUS; i++)
        if (d->vcpus[i])
            hv_vcpu_destroy(d->vcpus[i]);
    hv_blkback_detach_all(d);           /* before its ports and grants go */
    hv_netback_detach_all(d);
    hv_events_destroy(d);
    hv_devices_destroy(d);
    d->engine->destroy_vm(d);
    hv_console_close(d);                /* never started: the stream ends here */
    hv_mm_destroy(d);
    pv_domain_destroy(d);
    hv_gnt_destroy(d);                  /* after the vCPUs: nothing maps through it now */
    unmap_ram(d);
    pthread_mutex_destroy(&d->console_lock);
    pthread_mutex_destroy(&d->vcpu_lock);
    pthread_mutex_destroy(&d->mm_lock);
    pthread_mutex_destroy(&d->guest_mutex);
    pthread_cond_destroy(&d->guest_cond);
    free(d);
}

uint8_t *hv_domain_ram(struct hv_domain *d)
{
    return d->ram;
}

struct hv_counters *hv_domain_counters(struct hv_domain *d)
{
    return &d->counters;
}
