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
#include "grant_table.h"

#define HV_PAGE_SIZE   4096ULL
#define HV_PAGE_SHIFT  12
/* vCPUs per domain: each has its vcpu_info in shared_info, so no guest must register
 * one before VCPUOP_initialise (Xen refuses that for a vCPU without one) */
#define HV_MAX_VCPUS   XEN_LEGACY_MAX_VCPUS
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

/* The parts of a vCPU's mode the services care about (pvh.c). */
struct hv_cpu_mode {
    uint64_t cr0, cr4, efer;
    int      cs_long;               /* CS.L: 64-bit code (with EFER.LMA) */
    int      cpl;                   /* the privilege level it runs at */
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
    /* The CPU mode (PVH guests, which switch modes themselves; NULL: always 64-bit
     * long mode with paging on, as a PV vCPU). */
    int  (*get_mode)(struct hv_vcpu *v, struct hv_cpu_mode *mode);
    /* CPUID of the CPU the engine runs the guest on, before Xen's PV policy masks it
     * (NULL: the host's own, as KVM runs the guest on it). */
    void (*cpuid)(struct hv_vcpu *v, uint32_t leaf, uint32_t subleaf, uint32_t out[4]);
    /* The guest-physical address the engine's own TLB holds for gva now, for a read or
     * a write as the guest would make it: 0 with *gpa set, or -1 to walk the page
     * tables (NULL: always walk). It is as current as the guest's own accesses: every
     * change of the tables that must reach the guest flushes it (flush_tlb, set_cr3). */
    int  (*tlb_gpa)(struct hv_vcpu *v, uint64_t gva, int write, uint64_t *gpa);
};

/* The last page tlb_gpa found (the engine fills it): its answer for that page holds on
 * the engine's running thread while the TLB's flush count stays at at_gen. A bounce
 * frame and the iret frame after it are on one page (hv_tlb_page_hit). */
struct hv_tlb_page {
    const volatile uint64_t *gen;   /* the engine's flush count; NULL: nothing kept */
    const void *thread;             /* the thread it holds on (__builtin_thread_pointer) */
    uint64_t at_gen, va_page, gpa_page;
    int writable;                   /* found for a write: a plain RAM page, not a table */
};

/* What a parked vCPU waits for (vcpu.c). */
enum hv_wait {
    HV_WAIT_NONE,
    HV_WAIT_UPCALL,                 /* SCHEDOP_block: evtchn_upcall_pending */
    HV_WAIT_POLL,                   /* SCHEDOP_poll: one of its ports, or the deadline */
    HV_WAIT_INTERRUPT,              /* hlt: an interrupt it can take */
    HV_WAIT_UNPAUSE,                /* the toolstack paused it */
    HV_WAIT_UP,                     /* VCPUOP_down: until VCPUOP_up */
};

enum hv_sched_state { HV_SCHED_NEW, HV_SCHED_RUNNABLE, HV_SCHED_RUNNING, HV_SCHED_PARKED,
                      HV_SCHED_DONE };

#define HV_MAX_POLL_PORTS 128
struct hv_poll_set {
    uint32_t ports[HV_MAX_POLL_PORTS];
    uint32_t n;
};

/* One event channel (events.c). */
struct hv_evtchn {
    uint8_t  state;                 /* EVTCHNSTAT_* */
    uint16_t remote_dom;            /* unbound: who may bind; interdomain: the peer */
    uint32_t remote_port;           /* interdomain: the peer's port */
    uint32_t vcpu;                  /* vCPU notified */
    uint32_t virq;                  /* virq: which */
    /* interdomain with a backend inside trapless (the console ring): a send runs it */
    void (*backend)(struct hv_domain *d);
    /* ... or one of several (a block device): a send runs backend_fn(backend_arg) */
    void (*backend_fn)(void *arg);
    void *backend_arg;
};

/* Timers of one vCPU (timers.c); guarded by timers.c's process-wide lock. */
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
    /* 1 if the guest's locked instructions are atomic against other host threads (as
     * on hardware); 0: only the vCPU thread may write the guest's event words
     * (events.c, hv_events_flush). */
    int guest_atomics;
    /* 1 if the guest's own barriers (mfence, a locked instruction) order its stores and
     * loads against other host threads, as on hardware; 0: the engine drops them (Unicorn's
     * TCG emits no host fence outside its parallel mode, which Unicorn never uses), and a
     * thread that needs the guest's store-then-load ordered must force it (vcpu.c,
     * hv_guest_barrier). */
    int guest_fences;
    /* 1 if the CPU running a PV guest's ring 3 honours the guest's CR4.FSGSBASE
     * (rdfsbase and co. #UD while it is clear); 0: the PV CPUID policy does not offer
     * FSGSBASE, as Xen offers only what it can virtualize (pv_emul.c) */
    int cr4_fsgsbase;
};

extern const struct hv_engine_impl hv_kvm_engine;
extern const struct hv_engine_impl hv_bt_engine;

struct hv_domain {
    uint32_t domid;
    uint32_t guest_type;            /* enum hv_guest_type */
    uint8_t *ram;                   /* host mapping of guest-physical [0, ram_bytes) */
    uint64_t ram_bytes;
    /* ram is a shared mapping of this memory file, so a page of it can be mapped a
     * second time (another domain's grant mapping, a backend); the grant region
     * (grant_table.h) follows the RAM in the file and in ram[] */
    int      ram_fd;
    uint64_t gnt_bytes;
    struct hv_grant_table *gnt;     /* grant_table.c */
    uint64_t pt_pool_start, pt_pool_end;
    uint8_t  handle[16];
    struct hv_counters counters;

    int console_fd;
    pthread_mutex_t console_lock;   /* guards the input ring */
    uint8_t  console_in[HV_CONSOLE_IN];
    uint32_t console_in_prod, console_in_cons;
    struct hv_console_ring {        /* the PV console ring's backend (console_ring.c) */
        int      attached;
        uint64_t gpa;               /* the ring page */
        uint32_t port;              /* the guest's end of the console event channel */
        uint8_t  pending[HV_CONSOLE_IN];    /* input the in ring had no room for yet */
        uint32_t pending_prod, pending_cons;
        int      used;              /* the guest has written output to it */
    } cons_ring;                    /* guarded by console_lock */
    /* console_io output once the guest's console is its ring: the hypervisor's log of
     * the domain, as Xen's `xl dmesg` keeps it (the last HV_XEN_LOG bytes) */
    uint8_t  xen_log[HV_XEN_LOG];
    uint64_t xen_log_prod;

    /* shutdown: set once, by SCHEDOP_shutdown; read by the run loop */
    volatile int shutting_down;
    int shutdown_reason;
    int shutdown_code;              /* latched by SCHEDOP_shutdown_code, -1 if none */

    /* interrupt service (events.c): ports, the upcall vector, shared_info */
    pthread_mutex_t ev_lock;
    struct hv_evtchn *ports;        /* [max_ports] */
    uint64_t *deferred;             /* ports raised by other threads, for the vCPU to apply */
    int has_interdomain;            /* ever had an interdomain port (destroy looks at it) */
    uint32_t max_ports;
    uint8_t  callback_vector;       /* 0 = no upcalls */
    uint64_t hvm_params[HVM_NR_PARAMS];
    uint8_t *shared_info_private;   /* shared_info before the guest places it */
    uint64_t boot_wallclock_ns;     /* CLOCK_REALTIME at system time 0 */
    uint64_t boot_system_time;      /* system time when the domain was created */

    /* timer service (timers.c): one thread for the process; this domain's place in
     * its heap, under timers.c's lock */
    int32_t  timer_slot;            /* index in the heap, -1 when it has no deadline */
    uint64_t timer_key;             /* its earliest deadline (system time) */
    uint64_t device_deadline;       /* the PIT's next edge, HV_NO_DEADLINE if none */
    int timers_registered, timer_stopping, timer_in_service, timer_rewake;

    /* memory service (memory.c, mm.c): frame ownership, types and reservations */
    struct hv_mm mm;
    uint64_t shared_info_gpa;       /* where the guest placed shared_info; HV_NO_PAGE if not yet */

    /* the last hypercalls, for `trace` (hypercall.c) */
    struct hv_trace_entry trace[HV_TRACE_ENTRIES];
    uint64_t trace_seq;             /* the newest entry written */
    uint64_t trace_next;            /* the last seq handed out */
    uint64_t trace_tsc0, trace_ns0; /* the TSC and system time as the domain was made */

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
    uint32_t max_vcpus;             /* vcpus[0 .. max_vcpus) exist (vcpus=) */
    uint32_t kvm_ram_slots;         /* kvm: the memslot ids that hold RAM now (a bitmask) */
    struct hv_vcpu *vcpus[HV_MAX_VCPUS];
    /* Xen's domain_lock: guards bringing vCPUs up and down (vcpu_op.c) and the
     * domain's end (vcpu.c): */
    pthread_mutex_t vcpu_lock;
    int live_vcpus;                 /* started and not finished */
    int stopping;                   /* one vCPU finished: the others are stopped too */
    int result;                     /* the first vCPU's reason (enum hv_stop_reason) ... */
    int result_ready;               /* ... which is the domain's once every vCPU ended */
    struct hv_stop final_stop;
    /* page tables, frame types and descriptor tables change under this (recursive)
     * lock, one vCPU at a time, as Xen serialises much of it per domain */
    pthread_mutex_t mm_lock;
    /* engines without guest_atomics (bt): the guest lock, which the vCPU running guest
     * code or touching guest state holds, so that one vCPU of the domain runs at a
     * time (vcpu.c, hv_guest_lock); a fair ticket lock, handed over in turn */
    pthread_mutex_t guest_mutex;
    pthread_cond_t guest_cond;
    uint64_t guest_next, guest_serving;
    int guest_waiters;              /* threads waiting for it: the holder should yield */
};

#define HV_NO_PAGE (~0ULL)

struct hv_vcpu {
    struct hv_domain *dom;
    int id;
    const struct hv_engine_ops *ops;

    void *engine_priv;              /* bt's per-vCPU state; kvm's: the Unicorn twin */

    /* kvm engine */
    int fd;
    struct kvm_run *run;
    size_t run_size;
    uint64_t cr3;                   /* cached for the current exit */
    int cr3_valid;
    /* PVH on kvm: the guest-physical pages of the guest's TSS, kept out of KVM's
     * memslots (kvm.c, "events from ring 3"); HV_NO_PAGE when none. tss_seen_* is the
     * TR and cr3 they were found with. */
    uint64_t tss_trap[2];
    uint64_t tss_seen_base, tss_seen_cr3;
    uint16_t tss_seen_sel;
    /* Xen's PV model on kvm: compat-mode code runs on a Unicorn twin of the vCPU
     * (bt_twin.c), kept in engine_priv once made; on_twin while it runs there */
    int on_twin;
    struct kvm_xsave *twin_xsave;   /* KVM's XSAVE area as the twin took it (bt_twin.c) */
    uint64_t twin_dr[8], twin_xcr0; /* ... and the debug registers and XCR0 KVM has */
    int twin_flushed;               /* a flush KVM's translations still owe */

    /* the worker thread running it now (vcpu.c); kick_lock guards thread and in_run */
    pthread_mutex_t kick_lock;
    pthread_t thread;               /* zero when no thread runs it */
    int in_run;                     /* a worker is inside the engine's run for it */
    volatile int kicked;            /* the toolstack asked the vCPU to stop */
    volatile int paused;            /* the toolstack paused it */
    uint64_t cpu_ns;                /* CPU time of the slices that ended */
    uint64_t slice_cpu_start;       /* the worker's CPU clock when this slice began */
    uint64_t started_ns;

    /* scheduling (vcpu.c): wait_lock guards sched_state and the park fields */
    pthread_mutex_t wait_lock;
    int sched_state;                /* enum hv_sched_state */
    int waiting;                    /* parked, waiting for an event */
    int park_kind;                  /* enum hv_wait: what it waits for (HV_WAIT_NONE: runs) */
    uint64_t park_deadline;         /* system time, 0 = none (SCHEDOP_poll's timeout) */
    uint64_t wait_deadline;         /* the same, as the timer thread sees it (its lock) */
    int park_expired;               /* the deadline passed (the timer thread says so) */
    struct hv_poll_set poll;        /* SCHEDOP_poll's ports */
    struct hv_vcpu *rq_next;
    int deferred_events;            /* d->deferred has bits for this vCPU to apply */
    pthread_cond_t done_cond;
    /* another vCPU changed page tables or types: flush before entering the guest */
    int flush_wanted;
    int in_guest;                   /* inside KVM_RUN or Unicorn now (flush_wanted's ack) */
    int context_pending;            /* VCPUOP_up: load init_regs before its first entry */
    int engine_ready;               /* the engine's part exists (ops set): vCPU 0 from
                                     * creation, another from VCPUOP_initialise */       /* sched_state became HV_SCHED_DONE */

    /* Xen's life of a vCPU (vcpu_op.c), under the domain's vcpu_lock: the builder
     * initialises vCPU 0 and starts it; the others exist down and uninitialised until
     * VCPUOP_initialise gives them a context */
    int initialised;
    int down;                       /* Xen's _VPF_down: not to be run */
    uint64_t base_mfn;              /* its kernel L4 (holds a type reference); HV_NO_FRAME */
    struct xen_user_regs init_regs; /* VCPUOP_initialise's registers, for its first slice */
    uint64_t init_fs_base, init_gs_base;    /* ... and its active segment bases */

    struct hv_tlb_page tlb_page;    /* the engine's last tlb_gpa answer */
    uint64_t vcpu_info_gpa;         /* HV_NO_PAGE: the slot in shared_info */
    struct pv_vcpu pv;              /* Xen PV CPU state (pv_traps.c); unused in ring-0 PV */
    uint64_t runstate_area;         /* guest virtual address of its runstate_info, 0: none */
    uint64_t runstate_gpa;          /* where that was last found (HV_NO_PAGE: not mapped) */
    struct vcpu_runstate_info runstate; /* its accounting; wait_lock guards it (timers.c) */
    uint32_t virq_to_port[NR_VIRQS];
    struct hv_vcpu_timers timers;
    struct hv_lapic *lapic;         /* PVH: the emulated local APIC (dev_lapic.c), else NULL */
    uint64_t lapic_deadline;        /* its timer's next expiry, as the timer thread sees it */
    uint8_t  upcall_vector;         /* HVMOP_set_evtchn_upcall_vector: 0 = none */

    /* PV clock: guest TSC = host TSC + tsc_offset, scaled to ns by mul/shift */
    pthread_mutex_t time_lock;      /* the timer thread and the vCPU both refresh it */
    int64_t  tsc_offset;
    uint32_t tsc_to_system_mul;
    int8_t   tsc_shift;
    uint32_t time_version;
};

/* The guest-physical address of va from the engine's last tlb_gpa page: 1 if it holds
 * for this access here and now. Inline: a hypercall's guest accesses ask it first. */
static inline int hv_tlb_page_hit(const struct hv_vcpu *v, uint64_t va, int write,
                                  uint64_t *gpa)
{
    const struct hv_tlb_page *t = &v->tlb_page;

    if (!t->gen || (va & ~(HV_PAGE_SIZE - 1)) != t->va_page || *t->gen != t->at_gen ||
        (write && !t->writable) || t->thread != __builtin_thread_pointer())
        return 0;
    *gpa = t->gpa_page | (va & (HV_PAGE_SIZE - 1));
    return 1;
}

/* ---- guest memory: the one door (guest_mem.c) ---- */
int hv_gva_to_gpa(struct hv_vcpu *v, uint64_t gva, int write, uint64_t *gpa);
int hv_copy_from_guest(struct hv_vcpu *v, void *dst, uint64_t gva, uint64_t len);
int hv_copy_to_guest(struct hv_vcpu *v, uint64_t gva, const void *src, uint64_t len);
/* RAM and, after it, the domain's grant region (grant_table.h). Inline: the walks
 * call it for every entry. */
static inline int hv_gpa_valid(const struct hv_domain *d, uint64_t gpa, uint64_t len)
{
    uint64_t end = d->ram_bytes + d->gnt_bytes;
    return gpa < end && len <= end - gpa;
}
/* kvm_emul.c: an instruction KVM could not emulate; 0 done, -1 with why filled */
int hv_kvm_emulate(struct hv_vcpu *v, char *why, int why_len);
/* kvm_emul.c: the event KVM stopped on (KVM_EXIT_SHUTDOWN) because delivering it from
 * ring 3 needed the guest's TSS, which kvm.c keeps out of KVM's reach; and an
 * interrupt for a vCPU in ring 3. 0 delivered, -1 with why filled (empty: not an event
 * the TSS stopped), 1: a string port access from ring 3 that KVM must judge with the
 * TSS, 2: a ring-3 in/out the I/O bitmap allows, done here and counted as port I/O. */
int hv_kvm_deliver_stopped_event(struct hv_vcpu *v, char *why, int why_len);
int hv_kvm_deliver_interrupt(struct hv_vcpu *v, unsigned vector, char *why, int why_len);
/* bt_twin.c: the Unicorn twin of a kvm vCPU of Xen's PV model, which runs the vCPU while
 * it is in compat-mode code (this KVM-PVM host cannot). The state goes over whole: the
 * model's registers, the data selectors, cr3 and the x87/SSE state (struct kvm_fpu's
 * layout); the control state the model keeps (CR0.TS, CR4, XCR0, DR0-DR7, the LDT) is
 * loaded from v->pv. hv_twin_run runs it as the bt engine runs a vCPU, and returns
 * HV_TWIN_BACK once the vCPU runs 64-bit code again (or a stop, or HV_STOP_PARKED). */
#define HV_TWIN_BACK 100
struct kvm_fpu;
struct kvm_xsave;
struct hv_twin_segs { uint16_t ds, es, fs; };
int  hv_twin_enter(struct hv_vcpu *v, const struct pv_regs *r, const struct hv_twin_segs *segs,
                   uint64_t cr3, const struct kvm_fpu *fpu, char *err, int err_len);
int  hv_twin_run(struct hv_vcpu *v, struct hv_stop *stop);
void hv_twin_leave(struct hv_vcpu *v, struct pv_regs *r, struct hv_twin_segs *segs,
                   uint64_t *cr3, struct kvm_fpu *fpu);
void hv_twin_kick(struct hv_vcpu *v);
void hv_twin_destroy(struct hv_vcpu *v);
/* The engine ops while on the twin: bt's (its cr3, TLB); the caller sets kick. */
const struct hv_engine_ops *hv_twin_ops(void);

/* kvm.c: the vCPU's pending events (struct kvm_vcpu_events): from sync regs where
 * KVM stores them at every exit, else KVM_GET_VCPU_EVENTS. 0, or -1 with errno. */
struct kvm_vcpu_events;
int hv_kvm_vcpu_events(struct hv_vcpu *v, struct kvm_vcpu_events *ev);

/* ---- hypercall dispatch (hypercall.c) and the services ---- */
int64_t hv_hypercall(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_console_io(struct hv_vcpu *v, const struct hv_hcall *h);
void hv_console_emit(struct hv_domain *d, const uint8_t *buf, size_t len);
int  hv_console_ring_input(struct hv_domain *d, const uint8_t *buf, int len);
int64_t do_xen_version(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_sched_op(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_memory_op(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_mmu_update(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_mmuext_op(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_multicall(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_update_va_mapping(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_grant_table_op(struct hv_vcpu *v, const struct hv_hcall *h);

void hv_domain_shutdown(struct hv_domain *d, int reason);
void hv_console_close(struct hv_domain *d);     /* end the console stream (once) */

/* ---- interrupt service (events.c) ---- */
int64_t do_event_channel_op(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_hvm_op(struct hv_vcpu *v, const struct hv_hcall *h);
int  hv_events_init(struct hv_domain *d, uint32_t max_ports, char *err, int err_len);
void hv_events_destroy(struct hv_domain *d);
/* Where shared_info and a vCPU's vcpu_info are (inline: every bounce and hypercall
 * looks at its vcpu_info). */
static inline struct shared_info *hv_shared_info(struct hv_domain *d)
{
    if (d->shared_info_gpa == HV_NO_PAGE)
        return (struct shared_info *)d->shared_info_private;
    return (struct shared_info *)(d->ram + d->shared_info_gpa);
}

static inline struct vcpu_info *hv_vcpu_info(struct hv_vcpu *v)
{
    if (v->vcpu_info_gpa != HV_NO_PAGE)
        return (struct vcpu_info *)(v->dom->ram + v->vcpu_info_gpa);
    return &hv_shared_info(v->dom)->vcpu_info[v->id];
}
void hv_shared_info_placed(struct hv_domain *d, uint64_t old_gpa);
int  hv_send_virq(struct hv_domain *d, uint32_t vcpu, uint32_t virq);
/* A port whose remote end is a backend inside trapless: allocate it, and raise it. */
int  hv_evtchn_bind_backend(struct hv_domain *d, void (*backend)(struct hv_domain *d));
/* A backend binds the guest's unbound port `port` (allocated for dom0, as a frontend
 * does): a send on it then calls fn(arg). 0, or -XEN_EINVAL if the port is not that.
 * hv_evtchn_unbind_backend returns it to unbound; no call runs after it returns. */
int  hv_evtchn_bind_backend_port(struct hv_domain *d, uint32_t port, void (*fn)(void *arg),
                                 void *arg);
void hv_evtchn_unbind_backend(struct hv_domain *d, uint32_t port);
void hv_evtchn_backend_notify(struct hv_domain *d, uint32_t port);
/* ---- xenstore (xenstore.c) ---- */
void hv_xs_detach(struct hv_domain *d);     /* the domain goes away: its ring, watches, txs */
/* A backend inside trapless watches path (and below): fn(arg) runs, under the store's
 * lock, after each change there; it should only wake the backend's own thread.
 * hv_xs_host_unwatch(arg) drops arg's watches; no call runs after it returns. */
int  hv_xs_host_watch(const char *path, void (*fn)(void *arg), void *arg);
void hv_xs_host_unwatch(void *arg);
/* ---- the block backend (blkback.c) ---- */
void hv_blkback_detach_all(struct hv_domain *d);     /* the domain goes away */
/* ---- the network backend (netback.c) ---- */
void hv_netback_detach_all(struct hv_domain *d);     /* its cards leave their bridges */
int  hv_upcall_wanted(struct hv_vcpu *v);
int  hv_port_pending(struct hv_domain *d, uint32_t port);
void hv_events_flush(struct hv_vcpu *v);
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
/* VCPUOP_initialise, up, down, is_up on vCPU t (vcpu_op.c) */
int64_t hv_vcpu_life_op(struct hv_vcpu *v, int cmd, struct hv_vcpu *t, uint64_t arg);
/* The engine, on the vCPU's thread before its first entry after VCPUOP_up: its start of
 * day from VCPUOP_initialise's context; r gets the registers for the engine to load. */
int  hv_vcpu_load_context(struct hv_vcpu *v, struct pv_regs *r, char *err, int err_len);
int  hv_timers_start(struct hv_domain *d, char *err, int err_len);
void hv_timers_stop(struct hv_domain *d);
void hv_timers_wake(struct hv_domain *d);      /* a device deadline moved */
/* A parked vCPU's own deadline (SCHEDOP_poll's timeout); 0 clears it. */
void hv_timers_set_wait(struct hv_vcpu *v, uint64_t deadline);
void hv_runstate_enter(struct hv_vcpu *v, int state);     /* caller holds wait_lock */
void hv_runstate_publish(struct hv_vcpu *v, int translate);
void hv_timers_set_lapic(struct hv_vcpu *v, uint64_t deadline);   /* 0: disarmed */
uint64_t hv_system_time(void);
void hv_pvclock_update(struct hv_vcpu *v);
int  hv_pvclock_init(struct hv_vcpu *v, int64_t tsc_offset, uint64_t tsc_khz);

/* ---- vCPUs and their scheduler (vcpu.c), shared by the engines ---- */
void hv_vcpu_destroy(struct hv_vcpu *v);
/* A service or an engine: the vCPU must wait for `kind` (deadline: system time, 0 for
 * none). The engine's run returns HV_STOP_PARKED at its next check (hv_vcpu_must_park);
 * the scheduler parks the vCPU, holding no thread, until it can go on. */
void hv_vcpu_park(struct hv_vcpu *v, int kind, uint64_t deadline);
static inline int hv_vcpu_must_park(struct hv_vcpu *v)
{
    return v->park_kind != HV_WAIT_NONE;
}
/* Engines, before entering the guest: park if down; flush if another vCPU asked. 1 if
 * the vCPU must leave run (it parks), else 0; flush is the engine's TLB flush. */
int  hv_vcpu_before_entry(struct hv_vcpu *v, int (*flush)(struct hv_vcpu *v));
/* The vCPU's thread changed page tables or frame types: every other running vCPU of
 * the domain drops its cached translations before this returns (Xen's flush_tlb_mask). */
int  hv_vcpu_flush_others(struct hv_vcpu *v);
/* Create the engine's part of the vCPU if it has none yet: 0, or -1 with err filled. */
int  hv_vcpu_engine_ready(struct hv_vcpu *v, char *err, int err_len);
/* The domain's guest lock (engines without guest_atomics): held around every slice of
 * guest code and what the vCPU does between slices; recursive on one thread. */
void hv_guest_lock(struct hv_domain *d);
void hv_guest_unlock(struct hv_domain *d);
int  hv_guest_lock_held(struct hv_domain *d);   /* by this thread */
/* The holder lets a waiting vCPU of the domain have its turn (0 if none waits). */
int  hv_guest_lock_yield(struct hv_domain *d);
/* A full barrier between a host thread's store to memory it shares with the guest and
 * its next load from there, which also holds against the guest's own store-then-load
 * (io/ring.h's final checks) on an engine without guest_fences. */
void hv_guest_barrier(struct hv_domain *d);
/* VCPUOP_up of vCPU t (vcpu_op.c): its first run (0), or -1 if the domain is ending. */
int  hv_vcpu_bring_up(struct hv_vcpu *t);
/* Something it may wait for happened: wake it if parked, kick it if it runs. */
void hv_vcpu_notify(struct hv_vcpu *v);
void hv_vcpu_wake_poller(struct hv_vcpu *v);
/* Between these (nested, per thread), a vCPU made runnable gets its worker signalled
 * only at the last release: call hold before taking the locks a wake happens under,
 * release after letting them go (vcpu.c). */
void hv_wakes_hold(void);
void hv_wakes_release(void);
void hv_vcpu_deadline_passed(struct hv_vcpu *v);   /* the timer thread */
int  hv_next_vector(struct hv_vcpu *v, int *is_upcall);   /* -1: nothing to take */
int  hv_interrupt_due(struct hv_vcpu *v, void *unused);
void hv_vector_taken(struct hv_vcpu *v, int vector, int is_upcall);
int  hv_stop_with(struct hv_stop *stop, int reason, int code, uint64_t rip, const char *fmt, ...)
    __attribute__((format(printf, 5, 6)));

/* ---- PVH guests (pvh.c): the Xen CPUID leaves, the hypercall-page MSR, hypercalls
 * in the guest's own mode ---- */
/* Xen's CPUID leaf base + index, as PV and PVH guests see it (xen_cpuid.c) */
void hv_xen_cpuid(struct hv_vcpu *v, uint32_t index, uint32_t subleaf, uint32_t out[4]);
#define HV_PVH_CPUID_BASE     0x40000000u
#define HV_PVH_HYPERCALL_MSR  0x40000000u
#define HV_LAPIC_GPA          0xfee00000u   /* the local APIC's xAPIC page (Xen's default) */
/* 1 and out filled if leaf is one of the Xen leaves, 0 if not (the CPU's own answer). */
int  hv_pvh_cpuid(struct hv_vcpu *v, uint32_t leaf, uint32_t subleaf, uint32_t out[4]);
/* A wrmsr the engine could not do itself: 0 done, -1 the guest takes #GP(0). */
int  hv_pvh_wrmsr(struct hv_vcpu *v, uint32_t msr, uint64_t value);
int  hv_pvh_rdmsr(struct hv_vcpu *v, uint32_t msr, uint64_t *value);
int  hv_pvh_msr_owned(struct hv_vcpu *v, uint32_t msr);
int  hv_pvh_mmio(struct hv_vcpu *v, uint64_t gpa, int size, int is_write, uint8_t *data);
int  hv_pvh_port_io(struct hv_vcpu *v, uint16_t port, int size, int is_write, uint8_t *data);
/* The arguments of a hypercall made by vmcall/vmmcall or the PVH hypercall page, from
 * the registers of the mode the vCPU is in (64-bit: rdi rsi rdx r10 r8; 32-bit: ebx ecx
 * edx esi edi); returns the result as the guest's rax should hold it. */
struct hv_pvh_regs { uint64_t rax, rbx, rcx, rdx, rsi, rdi, r8, r10; };
uint64_t hv_pvh_hypercall(struct hv_vcpu *v, const struct hv_pvh_regs *r);
/* 1 if the vCPU runs 64-bit code now. */
int  hv_pvh_long_mode(struct hv_vcpu *v);

/* ---- helpers ---- */
uint64_t hv_now_ns(void);
void hv_set_error(char *buf, int len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
