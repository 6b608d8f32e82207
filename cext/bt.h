/*
 * bt.h - the bt engine's private definitions: the slice of Unicorn's C API it calls
 * (loaded at run time from the unicorn package's libunicorn), its per-vCPU state, and
 * what its files (bt.c, bt_cpu.c, bt_decode.c, bt_uc.c) share.
 */
#ifndef TRAPLESS_BT_H
#define TRAPLESS_BT_H
#include <pthread.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "hv.h"

/* ---- Unicorn 2 public API, declared here from its documentation ---- */

typedef struct uc_struct uc_engine;
typedef size_t uc_hook;
typedef int uc_err;

enum {
    UC_ARCH_X86 = 4,
    UC_MODE_64 = 1 << 3,
};

enum {
    UC_ERR_OK = 0,
    UC_ERR_NOMEM = 1,
    UC_ERR_READ_UNMAPPED = 6,
    UC_ERR_WRITE_UNMAPPED = 7,
    UC_ERR_FETCH_UNMAPPED = 8,
    UC_ERR_INSN_INVALID = 10,
    UC_ERR_WRITE_PROT = 12,
    UC_ERR_READ_PROT = 13,
    UC_ERR_FETCH_PROT = 14,
    UC_ERR_EXCEPTION = 21,
};

enum { UC_PROT_READ = 1, UC_PROT_WRITE = 2, UC_PROT_EXEC = 4 };

enum {                              /* uc_mem_type */
    UC_MEM_READ = 16, UC_MEM_WRITE, UC_MEM_FETCH,
    UC_MEM_READ_UNMAPPED, UC_MEM_WRITE_UNMAPPED, UC_MEM_FETCH_UNMAPPED,
    UC_MEM_WRITE_PROT, UC_MEM_READ_PROT, UC_MEM_FETCH_PROT,
};

enum {                              /* uc_hook_type */
    UC_HOOK_INTR = 1 << 0,
    UC_HOOK_INSN = 1 << 1,
    UC_HOOK_CODE = 1 << 2,
    UC_HOOK_BLOCK = 1 << 3,
    UC_HOOK_MEM_READ_UNMAPPED = 1 << 4,
    UC_HOOK_MEM_WRITE_UNMAPPED = 1 << 5,
    UC_HOOK_MEM_FETCH_UNMAPPED = 1 << 6,
    UC_HOOK_MEM_READ_PROT = 1 << 7,
    UC_HOOK_MEM_WRITE_PROT = 1 << 8,
    UC_HOOK_MEM_READ = 1 << 10,
    UC_HOOK_MEM_WRITE = 1 << 11,
    UC_HOOK_EDGE_GENERATED = 1 << 15,
    UC_HOOK_TLB_FILL = 1 << 17,
};

enum {                              /* uc_x86_reg (the ones we use) */
    UC_X86_REG_CS = 11, UC_X86_REG_DS = 17, UC_X86_REG_ES = 28, UC_X86_REG_SS = 49,
    UC_X86_REG_RAX = 35, UC_X86_REG_RBP = 36, UC_X86_REG_RBX = 37, UC_X86_REG_RCX = 38,
    UC_X86_REG_RDI = 39, UC_X86_REG_RDX = 40, UC_X86_REG_RIP = 41, UC_X86_REG_RSI = 43,
    UC_X86_REG_RSP = 44,
    UC_X86_REG_CR0 = 50, UC_X86_REG_CR2 = 52, UC_X86_REG_CR3 = 53, UC_X86_REG_CR4 = 54,
    UC_X86_REG_GS = 33, UC_X86_REG_DR0 = 66, UC_X86_REG_DR1, UC_X86_REG_DR2, UC_X86_REG_DR3,
    UC_X86_REG_DR6 = 72, UC_X86_REG_DR7 = 73,
    UC_X86_REG_R8 = 106, UC_X86_REG_R9, UC_X86_REG_R10, UC_X86_REG_R11, UC_X86_REG_R12,
    UC_X86_REG_R13, UC_X86_REG_R14, UC_X86_REG_R15,
    UC_X86_REG_IDTR = 242, UC_X86_REG_GDTR = 243, UC_X86_REG_LDTR = 244, UC_X86_REG_TR = 245,
    UC_X86_REG_FPCW = 246, UC_X86_REG_MSR = 248, UC_X86_REG_MXCSR = 249,
    UC_X86_REG_FS_BASE = 250, UC_X86_REG_GS_BASE = 251, UC_X86_REG_RFLAGS = 253,
};

enum { UC_X86_INS_IN = 218, UC_X86_INS_OUT = 500, UC_X86_INS_SYSCALL = 699,
       UC_X86_INS_SYSENTER = 700, UC_X86_INS_CPUID = 113 };

/* uc_ctl commands: type | (number of arguments << 26) | (1 << 30) for a write. */
#define BT_UC_CTL_WRITE(type, nargs) ((int)((type) | ((nargs) << 26) | (1 << 30)))
#define UC_CTL_TB_REMOVE_CACHE_W  BT_UC_CTL_WRITE(9, 2)
#define UC_CTL_TB_FLUSH_W         BT_UC_CTL_WRITE(10, 0)
#define UC_CTL_TLB_FLUSH_W        BT_UC_CTL_WRITE(11, 0)
#define UC_CTL_TLB_TYPE_W         BT_UC_CTL_WRITE(12, 1)
#define UC_CTL_TCG_BUFFER_SIZE_W  BT_UC_CTL_WRITE(13, 1)
#define UC_TLB_VIRTUAL 1

typedef struct {                    /* uc_x86_mmr: GDTR, IDTR, TR */
    uint16_t selector;
    uint64_t base;
    uint32_t limit;
    uint32_t flags;
} uc_x86_mmr;

typedef struct {                    /* uc_x86_msr */
    uint32_t rid;
    uint64_t value;
} uc_x86_msr;

typedef struct {                    /* uc_tlb_entry */
    uint64_t paddr;
    int perms;
} uc_tlb_entry;

typedef struct {                    /* uc_tb: a translation block as the edge hook sees it */
    uint64_t pc;
    uint16_t icount;
    uint16_t size;
} uc_tb;

/* The entry points, resolved by hv_bt_init (bt_uc.c). */
struct bt_uc_api {
    unsigned (*version)(unsigned *major, unsigned *minor);
    uc_err (*open)(int arch, int mode, uc_engine **uc);
    uc_err (*close)(uc_engine *uc);
    const char *(*strerror)(uc_err code);
    uc_err (*ctl)(uc_engine *uc, int control, ...);
    uc_err (*reg_read)(uc_engine *uc, int regid, void *value);
    uc_err (*reg_write)(uc_engine *uc, int regid, const void *value);
    uc_err (*reg_read_batch)(uc_engine *uc, int const *regs, void **vals, int count);
    uc_err (*reg_write_batch)(uc_engine *uc, int const *regs, void *const *vals, int count);
    uc_err (*mem_map_ptr)(uc_engine *uc, uint64_t address, uint64_t size, uint32_t perms, void *ptr);
    uc_err (*mem_protect)(uc_engine *uc, uint64_t address, uint64_t size, uint32_t perms);
    uc_err (*mmio_map)(uc_engine *uc, uint64_t address, uint64_t size,
                       uint64_t (*read_cb)(uc_engine *, uint64_t offset, unsigned size, void *),
                       void *user_read,
                       void (*write_cb)(uc_engine *, uint64_t offset, unsigned size, uint64_t value, void *),
                       void *user_write);
    uc_err (*emu_start)(uc_engine *uc, uint64_t begin, uint64_t until, uint64_t timeout, size_t count);
    uc_err (*emu_stop)(uc_engine *uc);
    uc_err (*hook_add)(uc_engine *uc, uc_hook *hh, int type, void *callback, void *user_data,
                       uint64_t begin, uint64_t end, ...);
    uc_err (*hook_del)(uc_engine *uc, uc_hook hh);
    /* Only in trapless's patched build (third_party/unicorn): a stop from any thread
     * at the next block start with RIP exact, and whether one is pending (cleared).
     * NULL with a stock libunicorn: kicks then go through the block hook (bt.c). */
    void (*kick)(uc_engine *uc);
    int (*kick_take)(uc_engine *uc);
    /* Only in trapless's patched build (uc-3-path.patch): uc_reg_write_batch for a code,
     * syscall or interrupt hook, where a rip written takes effect without leaving
     * Unicorn's cpu_exec. NULL with another libunicorn: bt_pv.c then writes rip
     * through reg_write_batch / reg_write, which leave it. */
    uc_err (*reg_write_batch_goto)(uc_engine *uc, int const *regs, void *const *vals, int count);
    /* Also uc-3-path.patch's, both or neither: where the vCPU keeps its 16 general
     * registers (rax rcx rdx rbx rsp rbp rsi rdi r8-r15) and rip, for hooks to read and
     * write in place; and, after a rip written there, the goto above. */
    uint64_t *(*x86_regs)(uc_engine *uc);
    void (*go)(uc_engine *uc);
    /* uc-3-path.patch's too: rflags and the CS selector in one call (NULL: the API's) */
    uc_err (*flags_cs)(uc_engine *uc, uint64_t *rflags, uint64_t *cs);
    /* uc-4-tlb.patch's: the host address of a guest byte as the vCPU's TLB holds it for
     * an access (0 read, 1 write, 2 fetch) of its current mode, NULL where the TLB has
     * no plain RAM entry for it (bt_tlb_host; NULL: always walk). */
    void *(*tlb_host)(uc_engine *uc, uint64_t va, int access);
    /* and flags_cs without the arithmetic flags (they read 0), for a hook that needs
     * only the control ones; and rflags written as reg_write writes it (NULL: the API) */
    uc_err (*control_flags_cs)(uc_engine *uc, uint64_t *rflags, uint64_t *cs);
    uc_err (*set_flags)(uc_engine *uc, uint64_t rflags);
    /* and int3 / int n calling the interrupt hooks in place, the block going on at the
     * rip they leave, as after a syscall (NULL: TCG leaves the block for them) */
    uc_err (*soft_int_in_place)(uc_engine *uc, bool on);
    /* and a count of the TLB's flushes: what tlb_host gave holds while it stays */
    const volatile uint64_t *(*tlb_gen)(uc_engine *uc);
    /* and where the vCPU keeps its GS base, in place (NULL: the API) */
    uint64_t *(*gs_base)(uc_engine *uc);
    /* uc-5-syscall.patch's: the one callback for syscall, in place of a walk over
     * every instruction hook (NULL: syscall's hook is one of them) */
    uc_err (*syscall_callback)(uc_engine *uc, void (*cb)(uc_engine *, void *), void *user);
};

extern struct bt_uc_api bt_uc;
/* 1 once hv_bt_init loaded a usable library; otherwise why not, in bt_uc_why. */
extern int bt_uc_loaded;
extern char bt_uc_why[200];

/* ---- the x86-64 instruction decoder (bt_decode.c) ---- */

/* Instructions the translator hands to VMM code instead of running them as they are. */
enum bt_kind {
    BT_PLAIN = 0,                   /* not sensitive */
    BT_HLT, BT_CLI, BT_STI, BT_POPF, BT_IRET,
    BT_MOV_CR, BT_MOV_DR, BT_WRMSR, BT_RDMSR,
    BT_LGDT, BT_LIDT, BT_LLDT, BT_LTR, BT_INVLPG, BT_CLTS, BT_CACHE,
    BT_PORT_IO,                     /* in/out/ins/outs: the port hooks take them */
    BT_READ_CRDR,                   /* mov from a control or debug register: harmless in
                                     * ring 0, privileged in ring 3 (Xen's PV model only) */
    BT_WRSEGBASE,                   /* wrfsbase/wrgsbase: TCG does not check the base is
                                     * canonical (Xen's PV model only) */
    BT_PRIV_RING3,                  /* swapgs, sysret, sysexit, rdpmc, xsetbv: fine for a
                                     * ring-0 kernel, #GP(0) in ring 3 (Xen's PV model only) */
    BT_VMCALL,                      /* vmcall/vmmcall: a PVH guest's hypercall */
    BT_INT_N,                       /* int3, int n, into: software interrupts, and their length */
    BT_ICEBP,                       /* icebp (int1): #DB as a trap; TCG has no icebp */
    BT_LOAD_SS,                     /* mov to SS: TCG checks it against its own ring 0,
                                     * not the guest's ring 3 (Xen's PV model only) */
    BT_STORE_SS,                    /* mov from SS: the guest's SS is the model's, not
                                     * Unicorn's ring-0 one (Xen's PV model only) */
    BT_FAR_RET,                     /* lret: TCG refuses an RPL-3 CS from its ring 0
                                     * (Xen's PV model only) */
    BT_FAR_JMP,                     /* ljmp and lcall, direct (32-bit code) or through
                                     * memory: the same (Xen's PV model only) */
};

struct bt_insn {
    uint8_t len;                    /* bytes, prefixes included */
    uint8_t kind;                   /* enum bt_kind */
    uint8_t opsize;                 /* operand size in bytes: 2, 4 or 8 */
    uint8_t has_modrm, modrm, sib, rex;
    uint8_t map;                    /* 0: one-byte opcodes, 1: 0F, 2: 0F38, 3: 0F3A */
    uint8_t opcode;
    uint8_t addr32;                 /* 0x67 prefix */
    uint8_t seg;                    /* 0x64 (fs) or 0x65 (gs) override, else 0 */
    uint8_t rep;                    /* 0xf2 or 0xf3 prefix, else 0 */
    uint8_t simd_prefix;            /* the last of 66, f2, f3 (an SSE opcode's), else 0 */
    uint8_t vex;                    /* VEX or EVEX encoded */
    int32_t disp;
    uint8_t disp_at_end_rel;        /* rip-relative: disp counts from the next instruction */
};

/* Decode one instruction from code[0..avail): 0 and *out filled, or -1 if it is not
 * a valid x86-64 instruction (or is cut off). */
int bt_decode(const uint8_t *code, int avail, struct bt_insn *out);
/* The same for 32-bit code (code32 = 1: a PVH guest before it enters long mode). */
int bt_decode_mode(const uint8_t *code, int avail, struct bt_insn *out, int code32);
/* How a 64-bit instruction reaches memory through SS (which decides #SS(0) against
 * #GP(0) for a non-canonical address): BT_STACK_IMPLICIT for push, pop, call, ret,
 * enter, leave, pushf, popf; BT_STACK_OPERAND for a memory operand based on rsp or rbp
 * without an FS or GS override (in 64-bit mode an ES, CS, SS or DS override changes
 * nothing: the default segment stays). 0 if neither. */
#define BT_STACK_IMPLICIT 1
#define BT_STACK_OPERAND  2
int bt_stack_access(const struct bt_insn *in);
/* 1 if the instruction is a div/idiv (the source of #DE). */
int bt_is_divide(const struct bt_insn *in);

/* ---- per-vCPU state (bt.c, bt_cpu.c) ---- */

/* A sensitive instruction the translator found: a code hook on its address. */
struct bt_site {
    struct bt_vcpu *b;
    uint64_t addr;
    uint8_t kind;                   /* enum bt_kind */
    uint8_t len;
    uint8_t bytes[15];              /* as decoded, to notice code that changed since */
    struct bt_site *next;           /* hash chain */
};

#define BT_SITE_BUCKETS 1024

/* The VMM's page for raising the CPL (bt_enter_ring0): host memory at guest-physical
 * BT_TRAMP_GPA, above any guest RAM, and at BT_TRAMP_VA in the TLB only while it runs
 * (the last user page, which x86-64 kernels leave unmapped). */
#define BT_TRAMP_GPA 0xfffff000ULL
#define BT_TRAMP_VA  0x7ffffffff000ULL
#define BT_TRAMP_GDT_ENTRIES 256
/* The same page seen below 4 GiB, where compat-mode code can reach it (bt_load_code_mode):
 * the last page there, also mapped only while the VMM's code runs. */
#define BT_TRAMP32_VA 0xfffff000ULL
struct bt_tramp {
    uint8_t  code[16];              /* rex.w call far [far_ptr] */
    uint8_t  iret[16];              /* iretq (bt_iret_to_user, bt_load_code_mode) */
    uint8_t  iret32[16];            /* iretd (bt_load_code_mode from compat mode) */
    uint32_t iret32_frame[4];       /* eip (the landing), cs, eflags */
    uint8_t  landing[16];           /* where both arrive: emu_start stops here */
    uint8_t  far_ptr[16];           /* m16:64: an ignored offset, the gate's selector */
    uint8_t  cpuid[16];             /* cpuid (bt_guest_cpuid) */
    uint8_t  xsetbv[16];            /* xsetbv (bt_set_xcr0) */
    uint64_t iret_frame[6];         /* rip (the landing), cs, rflags, rsp, ss */
    union {
        uint8_t tss[0x68];          /* a 64-bit TSS: only RSP0 is read */
        struct __attribute__((packed)) { uint32_t reserved; uint64_t rsp0; };
    };
    uint64_t gdt[BT_TRAMP_GDT_ENTRIES];
    uint8_t  stack[4096 - 176 - 0x68 - 8 * BT_TRAMP_GDT_ENTRIES - 8];
    uint8_t  stack_top[8];
} __attribute__((aligned(4096)));

#define BT_STALE_FRAMES 8

/* An exception or interrupt waiting to go through the guest's IDT. */
struct bt_event {
    int      vector;                /* -1: none */
    int      has_error;
    uint32_t error;
    int      soft;                  /* int n / int3: the gate's DPL is checked */
    int      insn_len;              /* raised by an instruction that rip is already past
                                     * (int n, icebp): its length, else 0 */
    int      set_cr2;
    uint64_t cr2;
};

struct bt_vcpu {
    struct hv_vcpu *v;
    uc_engine *uc;
    uint64_t mmio_base;             /* guest-physical address of the platform's MMIO page */

    /* kicks from other threads (bt_kick): kick_lock guards in_emu, kick_pending and
     * emu_gen; the process's one kicker thread repeats a stop that landed before the
     * emulator was ready to notice it */
    pthread_mutex_t kick_lock;
    int in_emu;
    int kick_pending;
    int stop_asked;                 /* a kick for the block hook to answer (bt.c) */
    uint64_t emu_gen;
    /* the kicker's queue (bt.c, under its lock) */
    struct bt_vcpu *kq_next;
    int kq_queued, kq_busy, kq_tries;
    uint64_t kq_gen, kq_due_ns;

    /* why the emulator stopped, set by the hooks (vCPU thread only) */
    struct bt_site *stopped_at;     /* a sensitive instruction for the VMM to emulate */
    struct bt_site *skip_once;      /* let this one run as it is, once */
    uint64_t retranslate_start, retranslate_end;    /* drop these blocks: new hooks */
    struct bt_event exception;      /* raised by the emulated instruction */
    int syscall_pending;            /* Xen's PV model: the guest ran `syscall` (1) or
                                     * `sysenter` (2) (bt_pv.c) */
    int stepping;                   /* this run of the emulator is one instruction */
    int in_intr_hook;               /* the interrupt hook is bouncing (bt_set_reg) */
    int fatal;                      /* stop the domain with fatal_stop */
    /* blocks run since this vCPU took the domain's guest lock; past BT_SLICE_BLOCKS
     * with another vCPU waiting, the block hook ends the slice (slice_over) */
    uint32_t slice_blocks;
    int slice_over;
    int tb_stale;                   /* another vCPU stored into code translated here */
    /* frames of code this vCPU took a writable TLB entry without execute for: their
     * blocks go before the next block runs (bt.c, data_entry_perms); more than
     * BT_STALE_FRAMES at once: all blocks go (tb_stale) */
    uint64_t stale_frames[BT_STALE_FRAMES];
    int nr_stale_frames;
    uint64_t dropping_gpa;          /* the frame drop_stale_frames shows at BT_TRAMP_VA */
    int dropping;
    struct hv_stop fatal_stop;

    /* cr3 as bt_write_cr3 last set it, where that is all that sets it (cr3_known:
     * Xen's PV model, whose guest's own mov to cr3 is the model's) */
    uint64_t cr3;
    int cr3_known;

    /* Unicorn's own general registers and rip (uc-3-path.patch's uc_x86_regs; NULL with
     * another library): a hook of Xen's PV model reads and writes them in place */
    uint64_t *uc_regs;

    /* the last guest-virtual access the TLB fill refused, for #PF/#GP */
    uint64_t fault_va;
    int fault_access;               /* UC_MEM_READ, UC_MEM_WRITE or UC_MEM_FETCH */
    int fault_present;              /* the page is mapped, the access is not allowed */
    int fault_rsvd;                 /* an entry of the walk had a reserved bit set */
    int walk_rsvd;                  /* bt_walk's own note of that, for the TLB fill */
    uint64_t rsvd_addr_bits;        /* entry address bits beyond MAXPHYADDR (0: not known yet) */
    int fault_noncanonical;

    /* ring 3 (bt_cpu.c): the walk checks ring-0 permissions whatever the CPL, for the
     * CPU's own accesses of a delivery from user mode */
    int kernel_view;
    struct bt_tramp *tramp;         /* the page bt_enter_ring0 runs from */
    int tramp_active;               /* the TLB maps BT_TRAMP_VA to it */
    /* where the int3/int n/into about to run ends: the interrupt it raises is a
     * software one (Unicorn reports only the vector), ~0 if none */
    uint64_t soft_int_end;
    int soft_int_len;
    /* a PVH guest's `syscall` the hook saw (Unicorn skips it): the run loop does it */
    int pvh_syscall_pending;
    uint64_t pvh_syscall_at;

    /* debug registers of Xen's PV model (bt_debug.c): while a breakpoint is armed or
     * TF is set the run loop steps one instruction at a time */
    uint16_t pv_ss;                 /* the guest's SS selector: Unicorn runs at its own
                                     * ring 0, where an RPL-3 SS cannot be loaded */
    uint8_t  uc_code_bits;          /* L (bit 0) and D (bit 1) of the code descriptor
                                     * Unicorn runs a PV guest with: 1 = 64-bit code */
    uc_hook db_mem_hook;            /* the data-breakpoint access hook, 0 if none */
    uint32_t db_hits;               /* B0-B3 of the data breakpoints this step touched */
    uint32_t db_shadow;             /* a #DB held by a mov-SS shadow: its DR6 bits */
    int db_shadow_armed;            /* the next instruction runs in that shadow */

    int twin;                       /* a kvm vCPU's twin (bt_twin.c): run until 64-bit code */
    void *run_thread;               /* inside bt_run: that thread's pointer, else NULL */
    /* TCG's TLB flush count (bt_uc.tlb_gen's, or NULL): the last page bt_tlb_gpa
     * found holds while it stays (hv_vcpu.tlb_page) */
    const volatile uint64_t *tlb_gen;
    uint64_t *uc_gs_base;           /* bt_uc.gs_base's, or NULL */
    struct bt_twin_code *twin_code; /* ... and the code it translated, as it left it */

    struct bt_site *sites[BT_SITE_BUCKETS];
    uint64_t nr_sites;

    /* stores and translated code, a bit per 4 KiB frame of RAM (bt.c): the TLB may
     * hold a writable entry without execute for the frame; translated code came from
     * the frame */
    uint8_t *written_frames, *code_frames;
    uint64_t frame_map_bytes;
};

/* bt.c: a Unicorn CPU with guest memory and the hooks, as v->engine_priv (0, or -1 with
 * err filled), and its end; the engine ops a bt vCPU runs with. */
int  bt_vcpu_open(struct hv_vcpu *v, char *err, int err_len);
void bt_vcpu_destroy(struct hv_vcpu *v);
extern const struct hv_engine_ops bt_vcpu_ops;
/* What the run loop of a twin returns once the vCPU runs 64-bit code again. */
#define BT_TWIN_BACK HV_TWIN_BACK

/* bt_cpu.c: the MMU walk, guest memory reads by virtual address, IDT delivery. */
int  bt_walk(struct bt_vcpu *b, uint64_t va, int access, uint64_t *gpa, int *perms, int *present);
int  bt_read_virt(struct bt_vcpu *b, uint64_t va, void *dst, int len);
int  bt_tlb_gpa(struct bt_vcpu *b, uint64_t va, int access, uint64_t *gpa);
/* cr3 without asking Unicorn where the VMM alone writes it (Xen's PV model). */
uint64_t bt_cr3(struct bt_vcpu *b);
/* Set cr3 (Unicorn flushes its TLB): 0, or -1 if Unicorn refused. */
int  bt_write_cr3(struct bt_vcpu *b, uint64_t cr3);
/* 1 if the vCPU runs 32-bit code now (a PVH guest before long mode, or compat mode). */
int  bt_code32(struct bt_vcpu *b);
uint64_t bt_reg(struct bt_vcpu *b, int regid);
void bt_set_reg(struct bt_vcpu *b, int regid, uint64_t value);
/* Deliver ev through the guest's IDT, escalating faults met on the way (#DF, then a
 * triple fault). 0, or -1 with stop filled (triple fault, or something bt cannot do). */
int  bt_deliver(struct bt_vcpu *b, const struct bt_event *ev, struct hv_stop *stop);
/* From ring 3 to ring 0 at code selector cs, whose GDT descriptor is desc (checked by
 * the caller: a present 64-bit code segment of DPL 0); SS becomes NULL, rsp stays. The
 * caller sets rip and rflags. 0, or -1 if Unicorn did not get there. */
int  bt_enter_ring0(struct bt_vcpu *b, uint16_t cs, uint64_t desc);
/* iretq to ring 3 with the frame (rip, cs, rflags, rsp, ss) the guest's iretq at rip
 * would pop, done by the CPU from the VMM's page so that the emulator stops right
 * after it (an interrupt waits): 0, or -1 if the CPU refused (nothing changed). */
int  bt_iret_to_user(struct bt_vcpu *b, const uint64_t frame[5]);
/* Make Unicorn run the code of descriptor desc (its L and D bits: 64-bit, 32-bit or
 * 16-bit compat code) at its own ring 0, without changing rip, rsp, rflags or the CS
 * selector: 0, or -1 if the CPU did not get there. Xen's PV model only. */
int  bt_load_code_mode(struct bt_vcpu *b, uint64_t desc);
/* CPUID as the guest sees it (Unicorn's CPU model, with the VMM's leaves): the CPU
 * runs one cpuid from the VMM's page. */
void bt_guest_cpuid(struct bt_vcpu *b, uint32_t leaf, uint32_t subleaf, uint32_t out[4]);
int  bt_set_xcr0(struct bt_vcpu *b, uint64_t xcr0);
/* The GDT descriptor a selector names: 0, or -1 (null, LDT, beyond the limit, unmapped). */
int  bt_gdt_entry(struct bt_vcpu *b, uint16_t sel, uint64_t *desc);
/* The #PF for the access the TLB fill refused last (cr2, error code). */
void bt_page_fault_event(struct bt_vcpu *b, struct bt_event *ev);
/* After an exit handled inside a hook: leave the emulator if the loop has work. */
void bt_after_exit(struct bt_vcpu *b);
void bt_after_delivery(struct bt_vcpu *b);

/* bt_pv.c: Xen's PV CPU model on this engine. Each returns 0, or -1 with stop filled. */
int  bt_pv_load_context(struct bt_vcpu *b, struct hv_stop *stop);
int  bt_pv_boot(struct bt_vcpu *b, const struct hv_boot_state *bs, char *err, int err_len);
void bt_pv_on_syscall(uc_engine *uc, void *user);
void bt_pv_on_sysenter(uc_engine *uc, void *user);
/* `syscall`, or `sysenter` (sysenter = 1), that the hook saw. */
int  bt_pv_syscall(struct bt_vcpu *b, int sysenter, struct hv_stop *stop);
int  bt_pv_exception(struct bt_vcpu *b, const struct bt_event *ev, struct hv_stop *stop);
/* From the interrupt hook: 1 if it bounced ev (a software interrupt) there and then. */
int  bt_pv_soft_interrupt(struct bt_vcpu *b, const struct bt_event *ev);
/* From the code hook of an int3 or int n site: 1 if it bounced it there, before TCG
 * raised it. */
int  bt_pv_int_at_site(struct bt_vcpu *b, const struct bt_site *s);
int  bt_pv_site(struct bt_vcpu *b, struct bt_site *s, struct hv_stop *stop);
int  bt_pv_events(struct bt_vcpu *b, struct hv_stop *stop);
/* All of the model's registers out of Unicorn, and into it (CS's mode loaded, GS and
 * FS with their bases, the control state when hw_dirty). */
void bt_pv_get_regs(struct bt_vcpu *b, struct pv_regs *r);
void bt_pv_set_regs(struct bt_vcpu *b, const struct pv_regs *r);
/* A #DB for the guest's trap table, with dr6_bits (B0-B3, BS) merged into its DR6. */
int  bt_pv_debug_exception(struct bt_vcpu *b, uint32_t dr6_bits, struct hv_stop *stop);

/* bt_debug.c: breakpoints and single-step of Xen's PV model (the run loop steps). */
/* 1 if the next instruction must run alone (breakpoints armed, TF, a mov-SS shadow). */
int  bt_debug_stepping(struct bt_vcpu *b);
/* The same with the guest's rflags already known (no register read). */
int  bt_debug_stepping_flags(struct bt_vcpu *b, uint64_t rflags);
/* Before it: an instruction breakpoint at rip. 0 run it, 1 a #DB was delivered, -1 stop. */
int  bt_debug_before(struct bt_vcpu *b, struct hv_stop *stop);
/* After it ran alone: the #DB trap its data accesses or TF call for. 0, or -1 stop. */
int  bt_debug_after(struct bt_vcpu *b, uint64_t rip_before, int tf_before, struct hv_stop *stop);

#define RFLAGS_TF (1ULL << 8)
#define RFLAGS_IF (1ULL << 9)
#define RFLAGS_NT (1ULL << 14)
#define RFLAGS_RF (1ULL << 16)
#define RFLAGS_VM (1ULL << 17)

/* ---- what the virtual CPU is (bt_platform.c) ---- */
/* 1 and out filled where the bt CPU's CPUID answer differs from TCG's model. */
int  bt_platform_cpuid(struct bt_vcpu *b, uint32_t leaf, uint32_t subleaf, uint32_t out[4]);
int  bt_platform_msr(struct bt_vcpu *b, uint32_t msr);     /* 1: one of its MSRs */
int  bt_platform_rdmsr(struct bt_vcpu *b, uint32_t msr, uint64_t *value);   /* -1: not one */
int  bt_platform_wrmsr(struct bt_vcpu *b, uint32_t msr, uint64_t value);    /* -1: #GP */

#endif
