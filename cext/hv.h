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

#define HV_PAGE_SIZE   4096ULL
#define HV_PAGE_SHIFT  12
#define HV_MAX_VCPUS   1
#define HV_CONSOLE_IN  4096         /* console input ring, bytes (power of two) */

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

    /* memory service (memory.c, mm.c): frame ownership, types and reservations */
    struct hv_mm mm;
    uint64_t shared_info_gpa;       /* where the guest placed shared_info; HV_NO_PAGE if not yet */

    int kvm_vm_fd;
    struct hv_vcpu *vcpus[HV_MAX_VCPUS];
};

#define HV_NO_PAGE (~0ULL)

struct hv_vcpu {
    struct hv_domain *dom;
    int id;
    const struct hv_engine_ops *ops;

    /* kvm engine */
    int fd;
    struct kvm_run *run;
    size_t run_size;
    uint64_t cr3;                   /* cached for the current exit */
    int cr3_valid;

    pthread_mutex_t kick_lock;
    pthread_t thread;
    int in_run;                     /* thread is inside hv_vcpu_run */
    volatile int kicked;
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

void hv_domain_shutdown(struct hv_domain *d, int reason);

/* ---- helpers ---- */
uint64_t hv_now_ns(void);
void hv_set_error(char *buf, int len, const char *fmt, ...) __attribute__((format(printf, 3, 4)));

#endif
