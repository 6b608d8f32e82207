/*
 * hv.h - internal definitions shared by the services, the dispatcher and the engines.
 */
#ifndef TRAPLESS_HV_H
#define TRAPLESS_HV_H

#include <pthread.h>
#include <stddef.h>
#include <stdint.h>

#include "../abi/xen_abi.h"
#include "hv_api.h"
#include "mm.h"
#include "devices.h"
#include "pv_cpu.h"

#define HV_PAGE_SIZE   4096ULL
#define HV_PAGE_SHIFT  12
#define HV_MAX_VCPUS   1
#define HV_CONSOLE_IN  4096         /* console input ring, bytes (power of two) */
#define HV_DEFAULT_MAX_PORTS 1024   /* event channel ports per domain unless configured */
#define HV_NO_DEADLINE (~0ULL)
#define TRAPLESS_XEN_MAJOR 4           /* the Xen version trapless answers as */
#define TRAPLESS_XEN_MINOR 19

/* The arguments of one hypercall, in Xen's x86-64 convention. */
struct hv_hcall {
    uint64_t nr;                    /* rax */
    uint64_t a1, a2, a3, a4, a5;    /* rdi, rsi, rdx, r10, r8 */
};

/* What a service needs from the engine running a vCPU (kept this small on purpose). */
struct hv_engine_ops {
    /* Guest-physical address of the current top-level page table. */
    int  (*get_cr3)(struct hv_vcpu *v, uint64_t *cr3);
    /* Make the vCPU leave guest mode soon (from any thread). */
    void (*kick)(struct hv_vcpu *v);
    /* Switch the top-level page table (vCPU thread only; flushes the guest TLB). */
    int  (*set_cr3)(struct hv_vcpu *v, uint64_t cr3);
    /* Drop the vCPU's cached translations after the hypervisor changed its page tables. */
    int  (*flush_tlb)(struct hv_vcpu *v);
};

/* One event channel (events.c). */
struct hv_evtchn {
    uint8_t  state;                 /* EVTCHNSTAT_* */
    uint16_t remote_dom;            /* unbound: who may bind; interdomain: the peer */
    uint32_t remote_port;           /* interdomain: the peer's port */
    uint32_t vcpu;                  /* vCPU notified */
    uint32_t virq;                  /* virq: which */
};

/* Timers of one vCPU (timers.c); guarded by the domain's timer_lock. */
struct hv_vcpu_timers {
    uint64_t singleshot;            /* absolute system time, 0 = off */
    uint64_t period, next_periodic; /* period 0 = off */
    uint64_t fired;                 /* expiries delivered */
};

/* An engine: what runs a domain's vCPUs (kvm.c, ...). */
struct hv_engine_impl {
    const char *name;
    int  (*available)(char *why, int why_len);
    int  (*create_vm)(struct hv_domain *d, char *err, int err_len);
    void (*destroy_vm)(struct hv_domain *d);
    int  (*vcpu_create)(struct hv_vcpu *v, char *err, int err_len);  /* sets v->ops */
    void (*vcpu_destroy)(struct hv_vcpu *v);
    int  (*set_boot_state)(struct hv_vcpu *v, const struct hv_boot_state *bs, char *err, int err_len);
    /* Run until the vCPU must stop; fills stop, returns enum hv_stop_reason. */
    int  (*run)(struct hv_vcpu *v, struct hv_stop *stop);
};

extern const struct hv_engine_impl hv_kvm_engine;
extern const struct hv_engine_impl hv_bt_engine;

struct hv_domain {
    uint32_t domid;
    uint8_t *ram;                   /* host mapping of guest-physical [0, ram_bytes) */
    uint64_t ram_bytes;
    uint64_t pt_pool_start, pt_pool_end;
    uint8_t  handle[16];
    struct hv_counters counters;

    int console_fd;
    pthread_mutex_t console_lock;   /* guards the input ring */
    uint8_t  console_in[HV_CONSOLE_IN];
    uint32_t console_in_prod, console_in_cons;

    /* shutdown: set once, by SCHEDOP_shutdown; read by the run loop */
    volatile int shutting_down;
    int shutdown_reason;
    int shutdown_code;              /* latched by SCHEDOP_shutdown_code, -1 if none */

    /* interrupt service (events.c): ports, the upcall vector, shared_info */
    pthread_mutex_t ev_lock;
    struct hv_evtchn *ports;        /* [max_ports] */
    uint32_t max_ports;
    uint8_t  callback_vector;       /* 0 = no upcalls */
    uint64_t hvm_params[HVM_NR_PARAMS];
    uint8_t *shared_info_private;   /* shared_info before the guest places it */
    uint64_t boot_wallclock_ns;     /* CLOCK_REALTIME at system time 0 */
    uint64_t boot_system_time;      /* system time when the domain was created */

    /* timer service (timers.c): one thread per domain fires every vCPU's timers */
    pthread_mutex_t timer_lock;
    pthread_cond_t  timer_cond;
    pthread_t timer_thread;
    int timer_thread_started, timer_stop;

    /* memory service (memory.c, mm.c): frame ownership, types and reservations */
    struct hv_mm mm;
    uint64_t shared_info_gpa;       /* where the guest placed shared_info; HV_NO_PAGE if not yet */

    /* the last hypercalls, for `trace` (hypercall.c) */
    struct hv_trace_entry trace[HV_TRACE_ENTRIES];
    uint64_t trace_seq;

    /* device models of native guests (devices.c); NULL when the domain has none */
    struct hv_devices *devices;

    /* the PV CPU model (pv_cpu.h): HV_PV_XEN runs the kernel in ring 3 under the
     * hypervisor's region of descriptor tables; HV_PV_RING0 is the legacy model */
    int pv_model;
    uint8_t *pv_region;             /* pv_region_bytes at PV_REGION_GPA; NULL for ring 0 */
    uint64_t pv_region_bytes;

    const struct hv_engine_impl *engine;
    void *engine_priv;              /* engine-specific per-domain state (not kvm's) */
    int kvm_vm_fd;
    struct hv_vcpu *vcpus[HV_MAX_VCPUS];
};

#define HV_NO_PAGE (~0ULL)

struct hv_vcpu {
    struct hv_domain *dom;
    int id;
    const struct hv_engine_ops *ops;

    void *engine_priv;              /* engine-specific per-vCPU state (not kvm's) */

    /* kvm engine */
    int fd;
    struct kvm_run *run;
    size_t run_size;
    uint64_t cr3;                   /* cached for the current exit */
    int cr3_valid;

    pthread_mutex_t kick_lock;
    pthread_t thread;
    int in_run;                     /* thread is inside hv_vcpu_run */
    volatile int kicked;            /* the toolstack asked the vCPU to stop */
    volatile int paused;            /* the toolstack paused it */
    uint64_t cpu_ns_at_stop;        /* thread CPU time when hv_vcpu_run last returned */

    /* blocking: SCHEDOP_block, SCHEDOP_poll and hlt sleep here until notified */
    pthread_mutex_t wait_lock;
    pthread_cond_t  wait_cond;
    int waiting;

    uint64_t vcpu_info_gpa;         /* HV_NO_PAGE: the slot in shared_info */
    struct pv_vcpu pv;              /* Xen PV CPU state (pv_traps.c); unused in ring-0 PV */
    uint32_t virq_to_port[NR_VIRQS];
    struct hv_vcpu_timers timers;

    /* PV clock: guest TSC = host TSC + tsc_offset, scaled to ns by mul/shift */
    pthread_mutex_t time_lock;      /* the timer thread and the vCPU both refresh it */
    int64_t  tsc_offset;
    uint32_t tsc_to_system_mul;
    int8_t   tsc_shift;
    uint32_t time_version;
};

/* ---- guest memory: the one door (guest_mem.c) ---- */
int hv_gva_to_gpa(struct hv_vcpu *v, uint64_t gva, int write, uint64_t *gpa);
int hv_copy_from_guest(struct hv_vcpu *v, void *dst, uint64_t gva, uint64_t len);
int hv_copy_to_guest(struct hv_vcpu *v, uint64_t gva, const void *src, uint64_t len);
int hv_gpa_valid(struct hv_domain *d, uint64_t gpa, uint64_t len);

/* ---- hypercall dispatch (hypercall.c) and the services ---- */
int64_t hv_hypercall(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_console_io(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_xen_version(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_sched_op(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_memory_op(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_mmu_update(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_mmuext_op(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_multicall(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_update_va_mapping(struct hv_vcpu *v, const struct hv_hcall *h);

void hv_domain_shutdown(struct hv_domain *d, int reason);

/* ---- interrupt service (events.c) ---- */
int64_t do_event_channel_op(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_hvm_op(struct hv_vcpu *v, const struct hv_hcall *h);
int  hv_events_init(struct hv_domain *d, uint32_t max_ports, char *err, int err_len);
void hv_events_destroy(struct hv_domain *d);
struct shared_info *hv_shared_info(struct hv_domain *d);
struct vcpu_info *hv_vcpu_info(struct hv_vcpu *v);
void hv_shared_info_placed(struct hv_domain *d, uint64_t old_gpa);
int  hv_send_virq(struct hv_domain *d, uint32_t vcpu, uint32_t virq);
int  hv_upcall_wanted(struct hv_vcpu *v);
void hv_vcpu_notify(struct hv_vcpu *v);
int  hv_vcpu_wait(struct hv_vcpu *v, uint64_t deadline, int (*done)(struct hv_vcpu *, void *), void *arg);
struct hv_domain *hv_domain_lookup(uint32_t domid);

/* ---- device models (devices.c): what a native guest's privileged I/O reaches ---- */
/* Port I/O the hypercall port does not take: 1 if a device model claimed it. */
int  hv_devices_port_io(struct hv_vcpu *v, uint16_t port, int size, int is_write, uint8_t *data);
/* A guest-physical access KVM could not satisfy from RAM: 1 if emulated. */
int  hv_devices_mmio(struct hv_vcpu *v, uint64_t gpa, int size, int is_write, uint8_t *data);
/* The vector of the highest-priority device interrupt ready for the CPU, or -1. */
int  hv_devices_irq_vector(struct hv_domain *d);
/* The CPU took that vector: the interrupt controller moves it to in-service. */
void hv_devices_irq_injected(struct hv_domain *d, int vector);
void hv_devices_destroy(struct hv_domain *d);
void hv_devices_console_input(struct hv_domain *d);    /* input queued: UART RX interrupt */

/* ---- timer service (timers.c) ---- */
int64_t do_set_timer_op(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_vcpu_op(struct hv_vcpu *v, const struct hv_hcall *h);
int  hv_timers_start(struct hv_domain *d, char *err, int err_len);
void hv_timers_stop(struct hv_domain *d);
uint64_t hv_system_time(void);
void hv_pvclock_update(struct hv_vcpu *v);
int  hv_pvclock_init(struct hv_vcpu *v, int64_t tsc_offset, uint64_t tsc_khz);

/* ---- vCPUs (vcpu.c), shared by the engines ---- */
void hv_vcpu_destroy(struct hv_vcpu *v);
int  hv_next_vector(struct hv_vcpu *v, int *is_upcall);   /* -1: nothing to take */
int  hv_interrupt_due(struct hv_vcpu *v, void *unused);
int  hv_vcpu_not_paused(struct hv_vcpu *v, void *unused);
int  hv_stop_with(struct hv_stop *stop, int reason, int code, uint64_t rip, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* ---- helpers ---- */
uint64_t hv_now_ns(void);
void hv_set_error(char *buf, int len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
