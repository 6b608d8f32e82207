/*
 * pv_cpu.h - Xen's x86-64 PV CPU model, shared by both engines (pv_region.c,
 * pv_traps.c, pv_emul.c, pv_ctrl.c, pv_desc.c).
 *
 * A PV guest kernel runs in ring 3 like its own user space, with Xen's flat selectors.
 * trapless owns the real GDT, IDT, TSS and syscall MSRs; they sit in a small region of
 * host memory mapped at guest-physical PV_REGION_GPA (outside guest RAM, so no guest
 * page table can name it) and at PV_AREA_VA in every L4 the guest uses (slot 271, the
 * last of Xen's reserved slots 256-271, written by us whenever an L4 is validated).
 * Slot 256 maps the read-only machine-to-phys table at MACH2PHYS_VIRT_START (the
 * identity, as pseudo-physical = machine here), whose pages follow the fixed frames.
 * (Slot 271 rather than 256 for the rest: this KVM-PVM host refuses ring-3 accesses to
 * slot 256 even where the mapping allows them, and the syscall landing page needs one.)
 * Exceptions,
 * `syscall` and event upcalls reach this layer as a struct pv_regs; it decides what
 * Xen would do (a hypercall, a bounce frame to the guest's trap table or callbacks, an
 * emulated instruction, or domain_crash) and hands the registers back to the engine.
 */
#ifndef TRAPLESS_PV_CPU_H
#define TRAPLESS_PV_CPU_H
#include <stdint.h>

struct hv_domain;
struct hv_vcpu;
struct hv_hcall;
struct hv_stop;
struct xen_machphys_mapping;

/* ---- the hypervisor's region ---- */

#define PV_REGION_GPA   0xF0000000ULL   /* above the largest guest RAM (3838 MiB) and its grant region */
#define PV_M2P_L4_SLOT  256             /* HYPERVISOR_VIRT_START: the M2P */
#define PV_AREA_L4_SLOT 271             /* the descriptor tables, stubs and stack */
#define PV_AREA_VA      0xffff878000000000ULL   /* the start of slot 271 */

/* Frames of the region, in order. */
enum pv_frame {
    PVF_M2P_L3,                 /* the L3 of slot 256 */
    PVF_L3, PVF_L2, PVF_L1,     /* the area's page tables (slot 271) */
    PVF_ZERO,                   /* the guest's 14 GDT pages until set_gdt: all not present */
    PVF_GDT,                    /* Xen's GDT page: entries 7168..7679 */
    PVF_IDT,
    PVF_TSS, PVF_TSS_END = PVF_TSS + 2,   /* the TSS and its I/O bitmap */
    PVF_STUBS,                  /* CPL0 exception stubs: push rax, `out` to PV_TRAP_PORT,
                                 * pop rax, iretq */
    PVF_LANDING,                /* LSTAR and CSTAR: user-readable, `out` to PV_SYSCALL_PORT */
    PVF_STACK, PVF_STACK_END = PVF_STACK + 1,
    PVF_M2P_L2,                 /* the M2P's L2; its L1s and its pages come after */
    PVF_NR
};

/* Virtual layout of the area (pages of 4 KiB from PV_AREA_VA). */
#define PV_GDT_VA       (PV_AREA_VA)                    /* 15 pages, limit 0xefff */
#define PV_GDT_LIMIT    0xefff
#define PV_IDT_VA       (PV_AREA_VA + 16 * 4096ULL)
#define PV_TSS_VA       (PV_AREA_VA + 17 * 4096ULL)
#define PV_TSS_LIMIT    (0x68 + 8192)                   /* the TSS, the bitmap, its 0xff end byte */
#define PV_STUBS_VA     (PV_AREA_VA + 20 * 4096ULL)
#define PV_LANDING_VA   (PV_AREA_VA + 21 * 4096ULL)
#define PV_LANDING32_VA (PV_LANDING_VA + 16)            /* CSTAR: `syscall` from compat code */
#define PV_STACK_VA     (PV_AREA_VA + 23 * 4096ULL)     /* page 22 stays unmapped: a guard */
#define PV_STACK_TOP    (PV_STACK_VA + 2 * 4096ULL)
#define PV_AREA_END     PV_STACK_TOP
/* The M2P again, in slot 271's second GiB (the same L2): where XENMEM_machphys_mapping
 * says it is, because this KVM-PVM host lets ring 3 read slot 271 but not slot 256. */
#define PV_M2P_VA       (PV_AREA_VA + (1ULL << 30))
#define PV_LDT_VA       (PV_AREA_VA + 32 * 4096ULL)     /* 16 pages: the guest's LDT frames */
#define PV_LDT_PAGES    16                              /* 8192 descriptors, Xen's maximum */
/* Each vCPU has its own GDT, TSS, ring-0 stack and LDT mapping, as Xen gives each its
 * own per-domain GDT/LDT slot: vCPU n's sit at the addresses above plus n times this,
 * under an L1 of its own (one L2 entry each). The IDT, stubs and landing page are
 * shared: they are vCPU 0's, which every vCPU's tables also map. */
#define PV_VCPU_STRIDE  (2ULL << 20)
#define PV_VCPU_VA(id, va) ((va) + (uint64_t)(id) * PV_VCPU_STRIDE)

/* Xen's own selectors in the reserved GDT page (the guest's are in xen_abi.h). */
#define PV_HYPER_CS     0xe008
#define PV_HYPER_DS     0xe010
#define PV_TSS_SEL      0xe040
#define PV_LDT_SEL      0xe050          /* the LDT descriptor (16 bytes) for MMUEXT_SET_LDT */

#define PV_STUB_SIZE    16
/* Guest RAM once more, whole, in 2 MiB pages, supervisor-only and writable, from slot
 * 271's fifth GiB: for the rewrite routine alone. */
#define PV_RAM_VA       (PV_AREA_VA + (4ULL << 30))
/* After the 32 stubs, ring-0 code that rewrites (a locked `or $0`) the page-table
 * entries listed in the lower half of the vCPU's top stack page, then jumps back into
 * the stub that was sent there (pv_rewrite_entries). On a host whose KVM shadows a
 * ring-3 kernel's tables it emulates ring-0 code, and an emulated write to a shadowed
 * table updates KVM's shadow of that entry: the entries trapless changed from the host
 * reach KVM that way (kvm.c). */
#define PV_REWRITE_VA   (PV_STUBS_VA + 32 * PV_STUB_SIZE)
/* Stub 0 (no error code) past its exit: pop %rax; iretq. */
#define PV_STUB_RESUME_VA (PV_STUBS_VA + 3)
#define PV_TRAP_PORT    0xCB    /* the exception stubs' exit (CPL0) */
#define PV_SYSCALL_PORT 0xCC    /* the syscall landing page's exit (CPL3, in the I/O bitmap) */

/* Which CPU model a domain's vCPUs follow. */
enum hv_pv_model {
    HV_PV_RING0 = 0,            /* trapless's legacy PV guests: kernel in ring 0, own IDT */
    HV_PV_XEN = 1,              /* Xen's x86-64 PV: kernel in ring 3, trap table, callbacks */
};

/* ---- per-vCPU state ---- */

struct pv_trap {
    uint64_t address;           /* 0: no handler */
    uint8_t  flags;             /* TI_DPL_MASK | TI_MASK_EVENTS */
};

#define PV_NR_CALLBACKS 8

/* The single-step trapless takes while the guest's breakpoints are armed on a CPU that
 * does not take them itself (pv_debug.c): the instruction the step runs, as decoded
 * before it. */
struct pv_step {
    int      on;                        /* the CPU's RFLAGS.TF is trapless's */
    int      guest_tf;                  /* ... and this the guest's own */
    int      decoded;                   /* the fields below describe the step */
    uint64_t rip;
    uint8_t  len;
    int      tf_before;                 /* the guest's TF as it starts: DR6.BS after */
    uint32_t hits;                      /* B0-B3 its memory accesses hit */
    int      pushes_flags;              /* pushf: the stored TF must be the guest's */
    int      sets_tf;                   /* popf, iretq: TF after it is the guest's */
    int      icebp;                     /* int1: its #DB is the guest's whatever it hit */
    int      load_ss;                   /* mov to SS: the next instruction shares the step */
    uint32_t next_hits;                 /* ... and its hits */
    uint32_t shadow;                    /* DR6 bits a mov-SS shadow holds for one more step */
    int      shadow_held;
};

struct pv_vcpu {
    int      user_mode;                 /* Xen's guest user mode; 0 = guest kernel mode */
    struct pv_trap traps[256];          /* the virtual IDT (set_trap_table) */
    uint64_t callback[PV_NR_CALLBACKS]; /* by CALLBACKTYPE_ */
    uint16_t callback_flags[PV_NR_CALLBACKS];
    uint64_t kernel_ss, kernel_sp;      /* stack_switch: where bounces from user mode go */
    uint64_t gs_base_other;             /* the GS base of the mode not running */
    uint64_t user_l4;                   /* MMUEXT_NEW_USER_BASEPTR frame; 0 = none, as Xen */
    uint64_t gdt_frames[14];            /* set_gdt's frames (FIRST_RESERVED_GDT_PAGE) */
    unsigned gdt_nr_frames;
    uint64_t ldt_base, ldt_ents;        /* MMUEXT_SET_LDT: the guest's view */
    uint64_t ldt_frames[PV_LDT_PAGES];  /* ... and the frames mapped at PV_LDT_VA */
    unsigned ldt_nr_frames;
    /* control state the guest sets by hypercall or emulated instruction (pv_ctrl.c) */
    uint64_t dr[8];                     /* virtual debug registers (4 and 5 unused) */
    uint64_t dr7_io;                    /* DR7 enables of I/O breakpoints (emulated) */
    uint32_t io_db_hits;                /* B0-B3 the port I/O just emulated hit */
    uint64_t cr4;                       /* the CR4 bits a PV guest controls (PV_CR4_GUEST) */
    uint64_t xcr0;                      /* XCR0, set by the emulated xsetbv */
    int      cr0_ts;                    /* virtual CR0.TS (fpu_taskswitch, clts, mov cr0) */
    unsigned iopl;                      /* virtual IOPL (set_iopl, or iret with the assist) */
    uint64_t iobmp;                     /* set_iobitmap: guest pointer, ports it covers */
    uint32_t iobmp_ports;
    uint64_t vm_assist;                 /* enabled VMASST_TYPE_ bits */
    int      hw_dirty;                  /* the engine must load cr0.TS, cr4, XCR0 and the DRs */
    struct pv_step step;                /* pv_debug.c, engines that step (kvm) */
    struct pv_regs *regs;               /* the registers of the exit being handled */
    int      iret_done;                 /* a multicall's iret has replaced them */
    /* the iret hypercall's frame at rsp, where the engine has read it already (bt's
     * syscall hook, which checks where it goes): do_iret takes it instead */
    const struct iret_context *iret_frame;
    uint64_t bounces, syscalls;         /* counters (tests, stats) */
};

/* The registers the model reads and changes; the first 18 fields are in kvm_regs'
 * order. cs/ss are the guest's selectors (RPL 3 when it runs). */
struct pv_regs {
    uint64_t rax, rbx, rcx, rdx, rsi, rdi, rsp, rbp;
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15;
    uint64_t rip, rflags;
    uint64_t cs, ss;
    uint64_t fs_base, gs_base;
    uint64_t gs_sel;                    /* the %gs selector */
};

/* CR4 bits: those a PV guest controls (Xen's PV_CR4_GUEST_MASK, each only where its
 * CPUID policy has the feature) and those it sees of Xen's own setting. */
#define PV_CR4_TSD       (1ULL << 2)
#define PV_CR4_DE        (1ULL << 3)
#define PV_CR4_FSGSBASE  (1ULL << 16)
#define PV_CR4_OSXSAVE   (1ULL << 18)
/* XCR0 state components: x87, SSE, AVX, and AVX-512's three */
#define PV_XCR0_X87      (1ULL << 0)
#define PV_XCR0_SSE      (1ULL << 1)
#define PV_XCR0_YMM      (1ULL << 2)
#define PV_XCR0_AVX512   (7ULL << 5)
#define PV_CR4_GUEST     (PV_CR4_TSD | PV_CR4_DE | PV_CR4_FSGSBASE | PV_CR4_OSXSAVE)
#define PV_CR4_VISIBLE   0x620ULL       /* OSXMMEXCPT OSFXSR PAE: what trapless runs with */
#define PV_CR0           0x80050033ULL  /* PG WP NE ET MP PE; TS is the guest's */
#define PV_CR0_TS        (1ULL << 3)

/* ---- pv_region.c: the region and Xen's L4 slots ---- */
int  pv_domain_init(struct hv_domain *d, int model, char *err, int err_len);
void pv_domain_destroy(struct hv_domain *d);
/* Xen's start of day for a vCPU: guest kernel mode on the boot stack, events masked. */
void pv_vcpu_boot(struct hv_vcpu *v, uint64_t rsp);
/* 1 if slot (0..511) of an L4 is Xen's: guest entries there are refused. */
int  pv_xen_l4_slot(int slot);
/* Xen's entry for one of its reserved L4 slots, which every validated guest L4
 * carries (0 for the slots trapless leaves empty). */
uint64_t pv_l4_entry(int slot);
/* 1 if va lies in the area of descriptor tables and stubs (the engines' exits). */
int  pv_in_area(uint64_t va);
/* Walk the hypervisor's tables for va in Xen's reserved slots: 0 with the guest-physical
 * page (a region frame, or a guest GDT frame) and whether ring 3 may read it, or -1. */
/* XENMEM_machphys_mapping's answer; -1 for a domain without the region (no M2P). */
int  pv_machphys_mapping(struct hv_domain *d, struct xen_machphys_mapping *m);
int  pv_region_walk(struct hv_domain *d, uint64_t va, uint64_t *gpa, int *user);
/* Map the guest's GDT frames into the first pages of the GDT (the rest: not present). */
void pv_map_gdt(struct hv_vcpu *v, const uint64_t *mfns, unsigned n);
/* Map the guest's LDT frames at PV_LDT_VA and describe them at PV_LDT_SEL (n = 0: no
 * LDT); the engine loads LDTR from the vCPU's ldt_ents (hw_dirty). */
void pv_map_ldt(struct hv_vcpu *v, const uint64_t *mfns, unsigned n, uint64_t ents);
/* List the entries at gpas[0..n) (guest RAM, n from 1 to HV_MM_CHANGED_MAX) for the
 * rewrite routine, which is to return to `back` in a stub: its address, for rip. */
uint64_t pv_rewrite_entries(struct hv_vcpu *v, const uint64_t *gpas, unsigned n, uint64_t back);
/* The host address of the vCPU's ring-0 stack (its lowest byte, at PV_STACK_VA). */
uint8_t *pv_vcpu_stack(struct hv_vcpu *v);

/* ---- pv_traps.c: what happens at each way into the hypervisor ---- */
/* Each returns 0 (resume the guest with *r) or -1 (the domain crashed; stop filled). */
int  pv_syscall(struct hv_vcpu *v, struct pv_regs *r, struct hv_stop *stop);
/* `sysenter`, where the CPU runs it in long mode (Intel's; AMD's raise #UD). */
int  pv_sysenter(struct hv_vcpu *v, struct pv_regs *r, struct hv_stop *stop);
/* An exception at r->rip (faults) or after it (traps); cr2 for #PF. */
int  pv_exception(struct hv_vcpu *v, struct pv_regs *r, int vector, uint32_t error,
                  uint64_t cr2, struct hv_stop *stop);
/* 1 if the CPU pushes an error code for this exception vector. */
int  pv_has_error_code(int vector);
/* `int n` (length len at r->rip) that the CPU left to us. */
int  pv_int_n(struct hv_vcpu *v, struct pv_regs *r, int n, int len, struct hv_stop *stop);
/* Before the guest runs again: an event upcall, if one is due. */
int  pv_deliver_events(struct hv_vcpu *v, struct pv_regs *r, struct hv_stop *stop);
int  pv_upcall_due(struct hv_vcpu *v);

int64_t do_set_trap_table(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_iret_entry(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_stack_switch(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_set_callbacks(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_callback_op(struct hv_vcpu *v, const struct hv_hcall *h);
/* pv_desc.c */
int64_t do_set_gdt(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_update_descriptor(struct hv_vcpu *v, const struct hv_hcall *h);
/* MMUEXT_SET_LDT(linear_addr, nr_ents): 0 or a negative Xen errno. */
int     pv_set_ldt(struct hv_vcpu *v, uint64_t base, uint64_t ents);
int     pv_set_gdt(struct hv_vcpu *v, const uint64_t *frames, uint64_t entries, int load);
void    pv_drop_gdt(struct hv_vcpu *v);


/* ---- pv_ctrl.c: control registers, debug registers, IOPL, vm_assist, segment bases ---- */
int64_t do_fpu_taskswitch(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_set_debugreg(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_get_debugreg(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_vm_assist(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_physdev_op(struct hv_vcpu *v, const struct hv_hcall *h);
int64_t do_set_segment_base(struct hv_vcpu *v, const struct hv_hcall *h);
/* Xen's set_debugreg on the vCPU's virtual DRs: 0 or a negative Xen errno. */
int     pv_set_debugreg(struct hv_vcpu *v, int reg, uint64_t value);
/* The debug register the guest reads (-1 if reg is not one it may name). */
int     pv_get_debugreg(struct hv_vcpu *v, int reg, uint64_t *value);
/* A write of the guest's CR0 or CR4 (mov to CRn): 0, or -1 for the #GP Xen raises. */
int     pv_write_cr(struct hv_vcpu *v, int cr, uint64_t value);
int     pv_write_xcr(struct hv_vcpu *v, uint32_t index, uint64_t value);
uint64_t pv_read_cr(struct hv_vcpu *v, int cr);
/* The descriptor sel names in the vCPU's GDT: 0, or -1 (an LDT selector, beyond it). */
int     pv_gdt_descriptor(struct hv_vcpu *v, unsigned sel, uint64_t *desc);
/* The descriptor sel names in the vCPU's GDT or LDT: 0, or -1 (beyond either). */
int     pv_segment_descriptor(struct hv_vcpu *v, unsigned sel, uint64_t *desc);
/* 1 if cs names a compat-mode code segment (a code descriptor with L clear). */
int     pv_compat_code(struct hv_vcpu *v, uint64_t cs);
/* May the current mode use port I/O (and cli/sti) under the virtual IOPL? */
int     pv_iopl_ok(struct hv_vcpu *v);
/* ... and these ports (the IOPL or, for in/out, the guest's I/O bitmap)? */
int     pv_ports_ok(struct hv_vcpu *v, unsigned port, unsigned bytes);

/* ---- pv_debug.c: breakpoints as the CPU takes them, for engines whose CPU does not ---- */
/* 1 if DR7 enables a data (data = 1) or instruction (data = 0) breakpoint. */
int      pv_debug_armed(const struct pv_vcpu *p, int data);
/* B0-B3 of the data breakpoints an access of size bytes at va hits. */
uint32_t pv_debug_data_hits(const struct pv_vcpu *p, uint64_t va, uint64_t size, int write);
/* B0-B3 of the instruction breakpoints at rip. */
uint32_t pv_debug_exec_hits(const struct pv_vcpu *p, uint64_t rip);
/* Xen's pv_inject_DB: the bits into the guest's DR6, then #DB through its trap table. */
int      pv_inject_db(struct hv_vcpu *v, struct pv_regs *r, uint32_t dr6_bits, struct hv_stop *stop);
/* Stepping with the CPU's TF (kvm). pv_step_entry: the guest left the CPU with r (a #DB
 * if debug_trap): its rflags (and a syscall's r11) get the guest's own TF back.
 * pv_step_trap: the step's #DB: deliver what the instruction hit, and BS. pv_step_resume:
 * r is about to run: raise an instruction breakpoint at it, decode the step and set the
 * CPU's TF in r->rflags while breakpoints are armed. 0, or -1 if the domain crashed. */
void     pv_step_entry(struct hv_vcpu *v, struct pv_regs *r, int debug_trap);
int      pv_step_trap(struct hv_vcpu *v, struct pv_regs *r, struct hv_stop *stop);
int      pv_step_resume(struct hv_vcpu *v, struct pv_regs *r, struct hv_stop *stop);

/* ---- pv_emul.c: instructions Xen emulates for a PV guest ---- */
/* Xen's PV CPUID policy for leaf/subleaf: out = eax, ebx, ecx, edx. */
void pv_cpuid(struct hv_vcpu *v, uint32_t leaf, uint32_t subleaf, uint32_t out[4]);
/* CPUID leaf 0's EBX: the first four letters of the vendor string */
#define VENDOR_AMD_EBX   0x68747541u    /* "Auth" */
#define VENDOR_INTEL_EBX 0x756e6547u    /* "Genu" */
/* Where a general register is in struct pv_regs, by its number in an encoding. */
size_t pv_gpr_offset(int n);
/* #UD at r->rip: the forced-emulation prefix + cpuid, or `int n` on hosts that report
 * it as #UD. 1 if handled (r updated), 0 if it is a real #UD for the guest, -1 crash. */
int  pv_emulate_ud(struct hv_vcpu *v, struct pv_regs *r, struct hv_stop *stop);
/* #SS(0) at r->rip, raised by the engine: 12 if the instruction reaches memory
 * through SS in 64-bit mode (bt_stack_access), else 13, the #GP(0) its non-canonical
 * address raises (an ES, CS, SS or DS override changes nothing in 64-bit mode; some
 * hosts raise #SS for an %ss: override all the same: this KVM-PVM host does). */
int  pv_stack_fault_vector(struct hv_vcpu *v, const struct pv_regs *r);
/* #GP(0) at r->rip: 1 if Xen would emulate it (r updated), else 0 (port I/O and
 * cli/sti in either mode, the rest in guest kernel mode only). */
int  pv_emulate_gp(struct hv_vcpu *v, struct pv_regs *r);
/* #GP(0) at a far call or jmp through memory: the CPU's #GP(selector) for a selector
 * it cannot use (no LDT, a call gate, beyond the GDT), whose error code this KVM-PVM host
 * loses and which TCG computes with Intel's operand size whatever the guest's vendor.
 * Returns the error code Xen's guest sees (selector & ~3), or 0 if it is not one. */
uint32_t pv_far_branch_error(struct hv_vcpu *v, struct pv_regs *r);
/* VMASST_TYPE_writable_pagetables: a guest kernel's store (mov, xchg, cmpxchg of 4 or
 * 8 bytes) into an L1 table it maps read-only, which #PF brought here, is applied as
 * an mmu_update of that entry (Xen's ptwr). 1 if done; 0: the #PF stands. */
int  pv_emulate_ptwr(struct hv_vcpu *v, struct pv_regs *r, uint64_t cr2);
/* A #PF at cr2 in the M2P, mapped readable, from a load the host refused: 1 if done. */
int  pv_emulate_m2p_load(struct hv_vcpu *v, struct pv_regs *r, uint64_t cr2);

#endif
