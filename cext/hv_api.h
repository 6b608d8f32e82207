/*
 * hv_api.h - what the C extension offers Python (cffi cdef reads the marked part).
 *
 * A domain owns guest memory, counters and the console; a vCPU runs on an engine.
 * Python builds the domain's memory, sets the boot state, then hands the vCPU to the
 * scheduler with hv_vcpu_start(): from then on C worker threads run it (no GIL), and a
 * vCPU that blocks holds no thread. When it stops for good (shutdown, fault, or a kick
 * from the toolstack) the domain's console stream ends (end of file on the console
 * fd) and hv_vcpu_result() tells why.
 */
#ifndef TRAPLESS_HV_API_H
#define TRAPLESS_HV_API_H
#include <stdint.h>

/* cdef-begin */

/* Exits, by reason: one counter each (the engines map their own exit codes here). */
enum hv_exit_reason {
    HV_EXIT_HYPERCALL,      /* out to the hypercall port */
    HV_EXIT_IO,             /* any other port I/O */
    HV_EXIT_MMIO,           /* access to guest-physical memory the guest may not touch */
    HV_EXIT_HLT,
    HV_EXIT_IRQ_WINDOW,     /* the vCPU became interruptible: inject now */
    HV_EXIT_INTR,           /* kicked out of the guest by a signal */
    HV_EXIT_SHUTDOWN,       /* triple fault */
    HV_EXIT_FAIL_ENTRY,
    HV_EXIT_OTHER,
    HV_EXIT_PRIV_INSN,      /* bt: a privileged instruction translated into VMM code */
    HV_EXIT_EXCEPTION,      /* Xen PV model: an exception the hypervisor handled or bounced */
    HV_EXIT_NR
};

/* Why a vCPU stopped. */
enum hv_stop_reason {
    HV_STOP_SHUTDOWN,       /* the guest shut down; code = Xen shutdown reason */
    HV_STOP_FAULT,          /* triple fault, or an exit the VMM cannot handle */
    HV_STOP_KICKED,         /* hv_vcpu_kick() from another thread */
    HV_STOP_ERROR,          /* the engine itself failed (ioctl error) */
    HV_STOP_PARKED          /* internal: it must wait (engine -> scheduler, never final) */
};

struct hv_stop {
    int      reason;        /* enum hv_stop_reason */
    int      code;          /* shutdown reason, or the engine's raw exit code */
    uint64_t rip;
    uint64_t elapsed_ns;    /* wall time from the vCPU's first instruction to the stop */
    char     message[200];  /* one line, for HV_STOP_FAULT and HV_STOP_ERROR */
};

struct hv_counters {
    uint64_t exits[HV_EXIT_NR];                           /* by enum hv_exit_reason */
    /* by hypercall number; the last slot counts numbers out of range */
    uint64_t hypercalls[TRAPLESS_NR_HYPERCALLS + 1];
    uint64_t hypercall_errors[TRAPLESS_NR_HYPERCALLS + 1]; /* returned a negative errno */
    uint64_t unknown_port_io;                   /* port I/O nobody claims */
    uint64_t upcalls;                           /* callback vectors injected */
    uint64_t blocks;                            /* SCHEDOP_block / poll / hlt sleeps */
    uint64_t twin_entries;                      /* kvm: compat code moved to a Unicorn twin */
};

/* The state a vCPU starts in: 64-bit long mode, flat segments, paging on (PV); or,
 * for a PVH guest, 32-bit flat protected mode with paging off and ebx = hvm_start_info. */
enum hv_boot_mode { HV_BOOT_LONG, HV_BOOT_PVH32 };
struct hv_boot_state {
    uint64_t rip;
    uint64_t rsp;
    uint64_t rsi;           /* start_info */
    uint64_t cr3;           /* guest-physical address of the top-level page table */
    uint64_t gdt_base;      /* guest-virtual */
    uint16_t gdt_limit;
    uint16_t code_selector;
    uint16_t data_selector;
    uint32_t mode;          /* enum hv_boot_mode */
    uint64_t rbx;           /* PVH: guest-physical address of hvm_start_info */
};

/* The kind of guest a domain runs (DESIGN.md section 6). */
enum hv_guest_type {
    HV_GUEST_PV,            /* Xen's PV ABI: start_info, the hypercall page from the note */
    HV_GUEST_PVH,           /* HVM container: ring 0, its own page tables, the Xen CPUID
                             * leaves, the hypercall-page MSR, vmcall/vmmcall */
};

enum hv_engine {
    HV_ENGINE_KVM,          /* hardware-assisted: /dev/kvm */
    HV_ENGINE_BT,           /* binary translation: Unicorn (QEMU's TCG) */
    HV_ENGINE_NR
};

struct hv_domain_config {
    int      engine;        /* enum hv_engine */
    uint32_t domid;
    uint64_t ram_bytes;
    uint64_t pt_pool_start; /* guest-physical range the guest may not write: page tables */
    uint64_t pt_pool_end;
    int      console_fd;    /* console output is written here; -1 drops it. The domain
                             * owns it from now on and closes it when its vCPU stops for
                             * good (or when it is destroyed): the reader sees EOF. */
    uint8_t  handle[16];    /* the domain's UUID (XENVER_guest_handle) */
    uint32_t max_evtchn_ports; /* 0 = the default (1024) */
    int      pv_model;      /* 0: legacy ring-0 PV kernel, 1: Xen's PV CPU model (pv_cpu.h) */
    uint32_t guest_type;    /* enum hv_guest_type */
    uint32_t max_vcpus;     /* vCPUs the domain has (xl's vcpus=), at most
                             * XEN_LEGACY_MAX_VCPUS; 0 = 1. vCPU 0 is the builder's; the
                             * others start down, for VCPUOP_initialise. */
};

/* One traced hypercall (the domain keeps the last HV_TRACE_ENTRIES). */
#define HV_TRACE_ENTRIES 256
struct hv_trace_entry {
    uint64_t seq;           /* 1, 2, 3 ... in call order */
    uint64_t time_ns;       /* system time when it returned */
    uint64_t nr;
    uint64_t args[5];
    int64_t  ret;
};

/* What a vCPU is doing, for the toolstack. */
enum hv_vcpu_state {
    HV_VCPU_STOPPED,        /* not started, or stopped for good */
    HV_VCPU_RUNNING,
    HV_VCPU_BLOCKED,        /* SCHEDOP_block / poll, or hlt */
    HV_VCPU_PAUSED
};

struct hv_domain;
struct hv_vcpu;

/* 1 if the hypercall table has a handler for nr (the rest answer -ENOSYS). */
int  hv_hypercall_implemented(uint32_t nr);

/* Engines. Returns 1 if usable; otherwise 0 and a one-line reason in why. */
int  hv_kvm_available(char *why, int why_len);
/* kvm for a PVH guest: 1 if usable, else 0 and why (the hypercall-page MSR's exit). */
int  hv_kvm_pvh_available(char *why, int why_len);
/* 1 if KVM can hand the VMM a guest's vmcall/vmmcall (KVM_CAP_XEN_HVM). */
int  hv_kvm_has_xen_hvm(void);
/* The bt engine calls Unicorn's C API from the library at this path (the unicorn
 * package's libunicorn): 0, or -1 with a one-line reason. Until it succeeds,
 * hv_bt_available says why bt cannot run. */
int  hv_bt_init(const char *library, char *err, int err_len);
int  hv_bt_available(char *why, int why_len);
/* 1 if the loaded libunicorn stops from another thread by itself (uc_kick, trapless's
 * patched build), so bt runs without a block hook; 0 with a stock one. */
int  hv_bt_exact_kicks(void);
/* 1 if the loaded libunicorn lets a hook move rip without leaving its cpu_exec
 * (uc_reg_write_batch_goto, trapless's patched build): bt's PV bounces use it. */
int  hv_bt_hook_goto(void);
/* bt's instruction decoder, for tests: the length of the instruction at code (and its
 * kind: 0 plain, else sensitive), or -1 if it is not a valid x86-64 instruction. */
int  hv_bt_insn_length(const uint8_t *code, int avail, int *kind);
/* The same for 32-bit code (a PVH guest's entry, before long mode). */
int  hv_bt_insn_length32(const uint8_t *code, int avail, int *kind);

/* The host-wide memory budget: the guest memory (maxmem) of all live domains together
 * may not exceed it; 0 means no budget. Creating a domain that would exceed it fails. */
void     hv_set_memory_budget(uint64_t bytes);
uint64_t hv_memory_budget(void);
uint64_t hv_memory_committed(void);     /* guest memory of the live domains, bytes */

/* Domains: NULL on failure with a one-line reason in err. */
struct hv_domain *hv_domain_create(const struct hv_domain_config *cfg, char *err, int err_len);
void     hv_domain_destroy(struct hv_domain *d);
uint8_t *hv_domain_ram(struct hv_domain *d);
struct hv_counters *hv_domain_counters(struct hv_domain *d);
int      hv_domain_console_input(struct hv_domain *d, const uint8_t *buf, int len);
#define HV_XEN_LOG 16384            /* bytes of it kept per domain (a power of two) */
/* The hypervisor's log of the domain: its console_io output once its console ring is in
 * use (the latest, at most max bytes); returns how many were copied. */
int      hv_domain_xen_log(struct hv_domain *d, uint8_t *out, int max);
/* Make a VIRQ pending on a vCPU, as the hypervisor's own devices do (0 or -errno). */
int      hv_domain_send_virq(struct hv_domain *d, uint32_t vcpu, uint32_t virq);
/* Event channel ports pending and not masked (shared_info), for the toolstack. */
int      hv_domain_pending_events(struct hv_domain *d);
/* Give the domain a PV console ring (console_ring.c): the page at guest-physical
 * ring_gpa and a new event channel whose other end is trapless's console backend.
 * Returns the guest's port (for start_info), or -errno. Once per domain. */
int      hv_console_ring_attach(struct hv_domain *d, uint64_t ring_gpa);
/* Set an HVM parameter as the domain builder does (PVH: HVM_PARAM_CONSOLE_PFN and
 * _EVTCHN, HVM_PARAM_STORE_*): 0, or -XEN_EINVAL for an index out of range or one the
 * guest itself sets (CALLBACK_IRQ). */
int      hv_domain_set_hvm_param(struct hv_domain *d, uint32_t index, uint64_t value);

/* Xenstore (xenstore.c): one store per process, as Xen's xenstored in dom0. */
/* Give the domain a xenstore ring: the page at guest-physical ring_gpa (start_info's
 * store_mfn for PV, HVM_PARAM_STORE_PFN for PVH) and a new event channel whose other
 * end is the store. Returns the guest's port, or -errno. Once per domain. */
int      hv_xs_attach(struct hv_domain *d, uint64_t ring_gpa);
/* One request as domain domid would send it on its ring (0: trapless itself, which may
 * do anything but watch: it has no ring for the events). The reply's type (XS_ERROR on
 * failure) goes to *reply_type and its payload (at most XENSTORE_PAYLOAD_MAX bytes) to
 * reply; returns the payload's length, or -ESRCH if domid has no ring, -E2BIG if len
 * exceeds XENSTORE_PAYLOAD_MAX. Watch events it causes go to the watchers' rings. */
int      hv_xs_request(uint32_t domid, uint32_t type, uint32_t tx_id, const uint8_t *payload,
                       uint32_t len, uint32_t *reply_type, uint8_t *reply);

/* What each unprivileged domain may hold; beyond it a request fails with Xen's error. */
struct hv_xs_quota {
    uint32_t entries;       /* nodes it owns (ENOSPC) */
    uint32_t value_bytes;   /* bytes in one node's value (ENOSPC) */
    uint32_t watches;       /* (E2BIG) */
    uint32_t transactions;  /* open at once (ENOSPC) */
    uint32_t perms;         /* entries in one node's permission list (ENOSPC) */
};
void     hv_xs_get_quota(struct hv_xs_quota *q);
void     hv_xs_set_quota(const struct hv_xs_quota *q);

struct hv_xs_stats {
    uint32_t entries;       /* nodes the domain owns */
    uint32_t watches;
    uint32_t transactions;
    uint32_t ring_error;    /* XENSTORE_ERROR_*: the ring is no longer served */
    uint64_t requests;      /* messages answered */
    uint64_t events_dropped;/* watch events its full output queue could not take */
    uint32_t tx_nodes;      /* nodes its open transactions hold copies of */
};
/* 0, or -ESRCH if the domain has no ring. */
int      hv_xs_stats(uint32_t domid, struct hv_xs_stats *out);

/* The block backend (blkback.c): a virtual block device of domain d, number devid, on
 * the raw image open at fd (the backend owns fd from here, and closes it). Its
 * xenstore directories must exist (the toolstack writes them); the backend publishes
 * its features, goes to InitWait, and serves the ring from a thread of its own once the
 * frontend connects. Destroying the domain stops it (acknowledged writes synced).
 * 0, or -1 with a one-line reason in err. */
int      hv_blkback_attach(struct hv_domain *d, uint32_t devid, int fd, int readonly,
                           char *err, int err_len);
struct hv_blkback_stats {
    uint32_t state;             /* the backend's XenbusState */
    uint64_t requests;          /* answered BLKIF_RSP_OKAY */
    uint64_t errors;            /* answered with an error */
    uint64_t sectors_read, sectors_written;
    uint64_t flushes;           /* fdatasyncs for flushes and barriers */
    uint64_t bad_grants;        /* requests refused for a grant that did not check out */
    uint64_t ring_broken;       /* 1: the ring's indexes made no sense; no longer served */
    uint64_t wakeups;           /* times its thread woke and found requests to serve */
    uint64_t notifies;          /* events it sent the frontend (responses it asked for) */
};
/* 0, or -XEN_ENOENT if domid has no such device. */
int      hv_blkback_stats(uint32_t domid, uint32_t devid, struct hv_blkback_stats *out);

/* The network backend (netback.c): virtual network card devid of domain d, whose guest
 * has MAC address mac (6 bytes), plugged into the software bridge called `bridge` (made
 * when its first card joins). Its xenstore directories must exist (the toolstack writes
 * them); the backend publishes its features, goes to InitWait, and moves frames from a
 * thread of its own once the frontend connects. Destroying the domain unplugs it.
 * 0, or -1 with a one-line reason in err. */
#define HV_NETBACK_BRIDGE_NAME 16       /* a bridge's name, with its NUL (Linux's IFNAMSIZ) */
int      hv_netback_attach(struct hv_domain *d, uint32_t devid, const uint8_t *mac,
                           const char *bridge, char *err, int err_len);
struct hv_netback_stats {
    uint32_t state;             /* the backend's XenbusState */
    uint64_t tx_frames, tx_bytes;   /* the guest sent (to the bridge) */
    uint64_t tx_errors;         /* frames refused: bad pieces, bad grants */
    uint64_t rx_frames, rx_bytes;   /* the guest received */
    uint64_t rx_dropped;        /* frames for the guest dropped: queue full, not connected */
    uint64_t bad_grants;        /* grants that did not check out */
    uint64_t ring_broken;       /* 1: a ring's indexes made no sense; no longer served */
};
/* 0, or -XEN_ENOENT if domid has no such device. */
int      hv_netback_stats(uint32_t domid, uint32_t devid, struct hv_netback_stats *out);

/* Memory service (memory.c, mm.c). hv_mm_init types and counts the builder's page
 * tables, walking from cr3 (once, after the domain's memory is built); hv_mm_audit
 * recounts every frame's references from the tables and checks Xen's invariants
 * (call it while the vCPU is stopped).
 * Both: 0, or -1 with a one-line reason in err. */
int      hv_mm_init(struct hv_domain *d, uint64_t cr3, char *err, int err_len);
/* After hv_mm_init: only frames below `populated` start populated (memory < maxmem). */
int      hv_mm_set_reservation(struct hv_domain *d, uint64_t populated, char *err, int err_len);
int      hv_mm_audit(struct hv_domain *d, char *err, int err_len);
/* Xen's PV model: shared_info lives at this frame from the start (start_info names it):
 * 0, or -1 if the frame is not one the guest may use. */
int      hv_domain_place_shared_info(struct hv_domain *d, uint64_t gpfn);
/* Pages of guest RAM resident in host memory (mincore); ~0 on failure. */
uint64_t hv_domain_resident_pages(struct hv_domain *d);

/* vCPUs. */
struct hv_vcpu *hv_vcpu_create(struct hv_domain *d, int id, char *err, int err_len);
int      hv_vcpu_set_boot_state(struct hv_vcpu *v, const struct hv_boot_state *bs, char *err, int err_len);
/* Hand the vCPU to the scheduler: 0, or -1 if it was started before. */
int      hv_vcpu_start(struct hv_vcpu *v);
/* Once it stopped for good: the reason (enum hv_stop_reason) with stop filled; -1 before. */
int      hv_vcpu_result(struct hv_vcpu *v, struct hv_stop *stop);
/* Threads the scheduler runs vCPUs on now (they come and go with the work). */
int      hv_sched_workers(void);
void     hv_vcpu_kick(struct hv_vcpu *v);
/* Pause: the vCPU leaves the guest and sleeps until unpaused (or stopped). */
void     hv_vcpu_pause(struct hv_vcpu *v, int paused);
int      hv_vcpu_state(struct hv_vcpu *v);
uint64_t hv_vcpu_cpu_ns(struct hv_vcpu *v);     /* CPU time spent running it */
/* Copy up to max of the latest traced hypercalls, oldest first; returns how many. */
int      hv_domain_trace(struct hv_domain *d, struct hv_trace_entry *out, int max);

/* Emulated PC devices of a native domain (devices.c, dev_*.c): where they sit. */
#define HV_UART_PORT        0x3F8   /* COM1, 16550 */
#define HV_UART_IRQ         4
#define HV_PIT_PORT         0x40    /* 8254: 0x40-0x42 counters, 0x43 control */
#define HV_PIT_HZ           1193182
#define HV_PIC_MASTER_PORT  0x20    /* 8259A pair: command, data */
#define HV_PIC_SLAVE_PORT   0xA0
#define HV_RTC_PORT         0x70    /* CMOS: index, data */
#define HV_EXIT_PORT        0x501   /* write the shutdown reason (isa-debug-exit's spot) */

enum hv_device {
    HV_DEV_UART, HV_DEV_PIT, HV_DEV_PIC, HV_DEV_RTC, HV_DEV_EXIT, HV_DEV_NR
};

/* What the device models saw. */
struct hv_device_stats {
    uint64_t port_io[HV_DEV_NR];    /* accesses each model handled, by enum hv_device */
    uint64_t bad_width;             /* wrong-width accesses to a model: ignored, read all-ones */
    uint64_t uart_tx_bytes, uart_rx_bytes;
    uint64_t pit_edges;             /* rising edges of PIT channel 0 (IRQ0) */
    uint64_t irqs_delivered;        /* vectors the CPU took from the PIC */
    uint64_t eois;
    uint64_t rtc_reads;
    uint64_t pte_writes;            /* trapped page-table stores, validated and applied */
    uint64_t pte_rejected;          /* ... refused (the domain crashed) */
    uint64_t pte_last_gpa, pte_last_value;  /* the last refused store */
    int64_t  pte_last_error;        /* ... and its Xen errno (negative) */
    uint32_t exit_value;            /* the last value written to the exit port */
};

/* Give a domain the devices a native guest drives (before its vCPU first runs):
 * 0, or -1 with a one-line reason. */
int      hv_domain_add_devices(struct hv_domain *d, char *err, int err_len);
/* Copy the device statistics: 0, or -1 if the domain has no devices. */
int      hv_domain_device_stats(struct hv_domain *d, struct hv_device_stats *out);
/* Drive the device bus directly, as a vCPU's access would (tests, tools). port: 1 if a
 * device model owns the port, 0 if not (a read then gives all-ones), -1 without devices
 * or with a size other than 1, 2, 4. mmio_write: a store into the page-table pool. */
int      hv_devices_port(struct hv_domain *d, uint16_t port, int size, int is_write, uint32_t *value);
int      hv_devices_mmio_write(struct hv_domain *d, uint64_t gpa, int size, uint64_t value);
/* The vector the PIC offers the CPU (-1: none), and the CPU taking it (INTA). */
int      hv_devices_pending_vector(struct hv_domain *d);
void     hv_devices_ack_vector(struct hv_domain *d, int vector);
/* Freeze the device clock at these times in ns (system time, wall time since the epoch);
 * 0, 0 returns it to the host's clocks. */
void     hv_devices_set_clock(struct hv_domain *d, uint64_t mono_ns, uint64_t wall_ns);

/* cdef-end */
#endif
