/*
 * bt_pv.c - the bt engine's side of Xen's PV CPU model (pv_cpu.h).
 *
 * Unicorn runs the guest at its own ring 0, so ring 3 is enforced here: the MMU walk
 * treats every guest access as a user access (bt_cpu.c), the decoder's sensitive
 * instructions (privileged ones, port I/O, popf, iretq) come here instead of running,
 * `syscall` is a hook, and exceptions go to pv_traps.c instead of an IDT. What the
 * model decides comes back as registers written into Unicorn.
 *
 * The hypervisor's region is mapped read-only at PV_REGION_GPA; Unicorn needs its GDT
 * page for segment loads. As the walk cannot tell Unicorn's own descriptor reads from
 * the guest's, a guest read of the region succeeds here where kvm gives a #PF.
 */
#include <string.h>

#include "bt.h"

#define RFLAGS_IF   (1ULL << 9)
#define RFLAGS_IOPL (3ULL << 12)
#define DR6_BS      (1u << 14)

static const int gpr_ids[18] = {
    UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RSI,
    UC_X86_REG_RDI, UC_X86_REG_RSP, UC_X86_REG_RBP, UC_X86_REG_R8, UC_X86_REG_R9,
    UC_X86_REG_R10, UC_X86_REG_R11, UC_X86_REG_R12, UC_X86_REG_R13, UC_X86_REG_R14,
    UC_X86_REG_R15, UC_X86_REG_RIP, UC_X86_REG_RFLAGS,
};

/* Unicorn's own general registers and rip in place (uc_x86_regs, bt_vcpu.uc_regs):
 * the instruction encoding's order, then rip. */
enum { UC_RAX = 0, UC_RCX = 1, UC_RDX = 2, UC_RBX = 3, UC_RSP = 4, UC_RBP = 5, UC_RSI = 6,
       UC_RDI = 7, UC_R8 = 8, UC_R9 = 9, UC_R10 = 10, UC_R11 = 11, UC_R12 = 12, UC_R13 = 13,
       UC_R14 = 14, UC_R15 = 15, UC_RIP = 16 };

/* The general registers a bounce or an iret reads or writes (read_bounce_regs), from
 * where Unicorn keeps them into r and old, and back: one load and store each. */
static void bounce_gprs_in_place(const uint64_t *g, struct pv_regs *r, struct pv_regs *old)
{
    r->rax = old->rax = g[UC_RAX];
    r->rcx = old->rcx = g[UC_RCX];
    r->rsp = old->rsp = g[UC_RSP];
    r->r11 = old->r11 = g[UC_R11];
    r->rip = old->rip = g[UC_RIP];
}

static void bounce_gprs_to_place(uint64_t *g, const struct pv_regs *r)
{
    g[UC_RAX] = r->rax;
    g[UC_RCX] = r->rcx;
    g[UC_RSP] = r->rsp;
    g[UC_R11] = r->r11;
    g[UC_RIP] = r->rip;
}

/* All of them and rip, for what the model may change any register in (its emulation
 * of a faulting instruction). */
static void gprs_to_place(uint64_t *g, const struct pv_regs *r)
{
    bounce_gprs_to_place(g, r);
    g[UC_RDX] = r->rdx;
    g[UC_RBX] = r->rbx;
    g[UC_RBP] = r->rbp;
    g[UC_RSI] = r->rsi;
    g[UC_RDI] = r->rdi;
    g[UC_R8] = r->r8;
    g[UC_R9] = r->r9;
    g[UC_R10] = r->r10;
    g[UC_R12] = r->r12;
    g[UC_R13] = r->r13;
    g[UC_R14] = r->r14;
    g[UC_R15] = r->r15;
}

/* The GS base, which a switch between guest kernel and user mode swaps: in place
 * where the library tells where (uc-4-tlb.patch), else through the API. */
static uint64_t gs_base_now(struct bt_vcpu *b)
{
    return b->uc_gs_base ? *b->uc_gs_base : bt_reg(b, UC_X86_REG_GS_BASE);
}

static void set_gs_base(struct bt_vcpu *b, uint64_t base)
{
    if (b->uc_gs_base)
        *b->uc_gs_base = base;
    else
        bt_set_reg(b, UC_X86_REG_GS_BASE, base);
}

static void read_regs(struct bt_vcpu *b, struct pv_regs *r)
{
    void *vals[18];
    uint64_t *slot = &r->rax;           /* pv_regs starts with these 18, in this order */
    for (int i = 0; i < 18; i++)
        vals[i] = slot + i;
    bt_uc.reg_read_batch(b->uc, gpr_ids, vals, 18);
    r->cs = bt_reg(b, UC_X86_REG_CS) & 0xffff;     /* Unicorn holds the guest's CS */
    r->ss = b->pv_ss;
    r->fs_base = bt_reg(b, UC_X86_REG_FS_BASE);
    r->gs_base = bt_reg(b, UC_X86_REG_GS_BASE);
    r->gs_sel = bt_reg(b, UC_X86_REG_GS) & 0xffff;
}

/* All 0, to start the registers a hook reads from: copied, not memset, whose string
 * store the loads of write_regs right after would wait for. */
static const struct pv_regs no_regs;

/* The registers an exception's bounce (its frame, a mode switch from user mode,
 * events on the way out) reads or writes: rcx, r11, rip, rflags, rsp, CS and, from
 * user mode only, the GS base (the switch swaps it); and rax, which the iret restores.
 * The others stay 0 in r and in old, so write_regs, which writes only what changed,
 * leaves them alone (each register read through the API costs: Unicorn's reg_read is
 * a switch over all of them), and goto_regs writes back only these (bounce_gprs_*). */
static void read_bounce_regs(struct bt_vcpu *b, struct pv_regs *r, struct pv_regs *old)
{
    static const int ids[] = { UC_X86_REG_RFLAGS, UC_X86_REG_CS, UC_X86_REG_GS_BASE,
                               UC_X86_REG_RCX, UC_X86_REG_R11, UC_X86_REG_RIP,
                               UC_X86_REG_RSP };
    const uint64_t *g = b->uc_regs;
    uint64_t cs = 0;
    int user = b->v->pv.user_mode;

    *r = no_regs;
    *old = no_regs;                     /* write_regs compares every field (the run
                                         * loop's bt_pv_exception) */
    if (g && bt_uc.flags_cs) {
        bounce_gprs_in_place(g, r, old);
        bt_uc.flags_cs(b->uc, &r->rflags, &cs);
        if (user)
            r->gs_base = gs_base_now(b);
    } else {
        void *vals[] = { &r->rflags, &cs, &r->gs_base, &r->rcx, &r->r11, &r->rip, &r->rsp };
        if (g) {
            bounce_gprs_in_place(g, r, old);
            bt_uc.reg_read_batch(b->uc, ids, vals, user ? 3 : 2);
        } else if (user) {
            bt_uc.reg_read_batch(b->uc, ids, vals, 7);
        } else {
            bt_uc.reg_read_batch(b->uc, ids, vals, 2);
            bt_uc.reg_read_batch(b->uc, ids + 3, vals + 3, 4);
        }
    }
    r->cs = cs & 0xffff;
    r->ss = b->pv_ss;
    /* old the same, filled field by field: a copy of r right after the stores that
     * filled it waited for them (perf: most of a bounce's time in its hook) */
    old->rcx = r->rcx;
    old->r11 = r->r11;
    old->rip = r->rip;
    old->rsp = r->rsp;
    old->rflags = r->rflags;
    old->gs_base = r->gs_base;
    old->cs = r->cs;
    old->ss = r->ss;
}

/* CR0.TS, CR4.FSGSBASE/OSXSAVE, XCR0 and the debug registers, as the model last set
 * them. TCG honours TS (#NM), FSGSBASE and OSXSAVE (#UD); Unicorn takes the debug registers but never
 * turns them into breakpoints, so no #DB comes from them on bt. */
static void load_control(struct bt_vcpu *b)
{
    struct pv_vcpu *p = &b->v->pv;
    static const int drs[6] = { UC_X86_REG_DR0, UC_X86_REG_DR1, UC_X86_REG_DR2,
                                UC_X86_REG_DR3, UC_X86_REG_DR6, UC_X86_REG_DR7 };
    const uint64_t vals[6] = { p->dr[0], p->dr[1], p->dr[2], p->dr[3], p->dr[6], p->dr[7] };
    uint64_t cr0 = bt_reg(b, UC_X86_REG_CR0), cr4 = bt_reg(b, UC_X86_REG_CR4);

    bt_set_reg(b, UC_X86_REG_CR0, (cr0 & ~PV_CR0_TS) | (p->cr0_ts ? PV_CR0_TS : 0));
    bt_set_reg(b, UC_X86_REG_CR4, (cr4 & ~(PV_CR4_FSGSBASE | PV_CR4_OSXSAVE)) |
                                  (p->cr4 & (PV_CR4_FSGSBASE | PV_CR4_OSXSAVE)));
    if (p->cr4 & PV_CR4_OSXSAVE)
        bt_set_xcr0(b, p->xcr0);        /* the policy is TCG's CPUID: it takes it */
    uc_x86_mmr ldtr = { .selector = p->ldt_ents ? PV_LDT_SEL : 0, .base = PV_VCPU_VA(b->v->id, PV_LDT_VA),
                        .limit = p->ldt_ents ? (uint32_t)(p->ldt_ents * 8 - 1) : 0,
                        .flags = p->ldt_ents ? 0x8200 : 0 };      /* present, type 2 */

    for (int i = 0; i < 6; i++)
        bt_set_reg(b, drs[i], vals[i]);
    bt_uc.reg_write(b->uc, UC_X86_REG_LDTR, &ldtr);
    p->hw_dirty = 0;
}

/* A new CS (a far transfer, iret, bounce). Unicorn's register write sets the selector
 * alone, so where the new code segment's mode (64-bit or compat, from its L and D
 * bits) is not the one Unicorn runs, the CPU loads it first (bt_load_code_mode). */
static void set_code_selector(struct bt_vcpu *b, const struct pv_regs *r)
{
    uint64_t desc = 1ULL << 53;         /* 64-bit code, unless cs is compat code */

    if (pv_compat_code(b->v, r->cs))
        pv_segment_descriptor(b->v, (unsigned)r->cs & 0xffff, &desc);
    if (((desc >> 53) & 3) != b->uc_code_bits && bt_load_code_mode(b, desc) < 0 &&
        !b->fatal) {
        b->fatal = 1;
        hv_stop_with(&b->fatal_stop, HV_STOP_FAULT, 0, r->rip, "bt: Unicorn did not switch "
                     "to the mode of code selector %#llx (rip %#llx)",
                     (unsigned long long)r->cs, (unsigned long long)r->rip);
    }
    bt_set_reg(b, UC_X86_REG_CS, r->cs);
}

/* Which of the general registers, rip and rflags changed: their ids and values, for
 * one batch write; how many. The comparisons first, into a mask, without a branch
 * (which ones differ varies), then one store per register that changed: stores at an
 * index each comparison moves kept the loads of the next waiting. */
static int changed_gprs(const struct pv_regs *r, const struct pv_regs *old, int ids[18],
                        void *vals[18])
{
    const uint64_t *now = &r->rax, *was = &old->rax;
    uint32_t changed = 0;
    int n = 0;

    for (int i = 0; i < 18; i++)
        changed |= (uint32_t)(now[i] != was[i]) << i;
    for (; changed; changed &= changed - 1, n++) {
        int i = __builtin_ctz(changed);
        ids[n] = gpr_ids[i];
        vals[n] = (void *)&now[i];
    }
    return n;
}

/* CS, %gs and the bases, SS and the control state, where they changed. */
static void write_segments(struct bt_vcpu *b, const struct pv_regs *r, const struct pv_regs *old)
{
    if (r->cs != old->cs)
        set_code_selector(b, r);
    if (r->gs_sel != old->gs_sel)
        bt_set_reg(b, UC_X86_REG_GS, r->gs_sel);     /* loads its base: set ours after */
    if (r->gs_base != old->gs_base || r->gs_sel != old->gs_sel)
        set_gs_base(b, r->gs_base);
    if (r->fs_base != old->fs_base)
        bt_set_reg(b, UC_X86_REG_FS_BASE, r->fs_base);
    b->pv_ss = (uint16_t)r->ss;
    if (b->v->pv.hw_dirty)
        load_control(b);
}

/* What changed of the general registers, rip and rflags goes to Unicorn in one batch
 * (a write of rip among them ends its cpu_exec, as uc_reg_write's does, but leaves no
 * note to skip the pc sync behind: see bt_set_reg). Then CS, %gs and the bases. */
static void write_regs(struct bt_vcpu *b, const struct pv_regs *r, const struct pv_regs *old)
{
    int ids[18], n;
    void *vals[18];

    n = changed_gprs(r, old, ids, vals);
    if (n)
        bt_uc.reg_write_batch(b->uc, ids, vals, n);
    write_segments(b, r, old);
}

/* The same from a code, `syscall` or interrupt hook that moves the guest (a bounce,
 * an iret) with the patched library's goto batch (uc-3-path.patch): the new rip takes
 * effect without Unicorn leaving its cpu_exec and entering it again. The batch goes
 * last, as a load of CS's mode or of XCR0 runs the trampoline (a nested emu_start,
 * which would drop a goto made before it). r holds every general register and rip
 * (all), or those of a bounce (read_bounce_regs). 1 if written so, 0 if the library
 * has no goto (nothing written). */
static int goto_regs(struct bt_vcpu *b, const struct pv_regs *r, const struct pv_regs *old,
                     int all)
{
    uint64_t *g = b->uc_regs;

    if (!bt_uc.reg_write_batch_goto || !g)
        return 0;
    if (r->cs != old->cs || r->gs_sel != old->gs_sel || r->gs_base != old->gs_base ||
        r->fs_base != old->fs_base || b->v->pv.hw_dirty)
        write_segments(b, r, old);
    else
        b->pv_ss = (uint16_t)r->ss;
    if (all)
        gprs_to_place(g, r);
    else
        bounce_gprs_to_place(g, r);
    if (r->rflags != old->rflags) {
        if (bt_uc.set_flags)
            bt_uc.set_flags(b->uc, r->rflags);
        else
            bt_set_reg(b, UC_X86_REG_RFLAGS, r->rflags);
    }
    if (r->rip != old->rip)
        bt_uc.go(b->uc);
    return 1;
}

int bt_pv_boot(struct bt_vcpu *b, const struct hv_boot_state *bs, char *err, int err_len)
{
    uc_x86_mmr gdtr = { .base = PV_VCPU_VA(b->v->id, PV_GDT_VA), .limit = PV_GDT_LIMIT };
    uint16_t cs = FLAT_KERNEL_CS, null = 0;

    if (bt_uc.reg_write(b->uc, UC_X86_REG_GDTR, &gdtr) != UC_ERR_OK ||
        bt_uc.reg_write(b->uc, UC_X86_REG_CS, &cs) != UC_ERR_OK) {
        hv_set_error(err, err_len, "Unicorn will not load Xen's flat code selector");
        return -1;
    }
    bt_uc.reg_write(b->uc, UC_X86_REG_DS, &null);
    bt_uc.reg_write(b->uc, UC_X86_REG_ES, &null);
    bt_set_reg(b, UC_X86_REG_RFLAGS, 0x202);        /* IF on; events masked instead */
    b->pv_ss = FLAT_KERNEL_SS;
    b->uc_code_bits = 1;                            /* 64-bit code */
    pv_vcpu_boot(b->v, bs->rsp);
    return 0;
}

/* VCPUOP_up: the context VCPUOP_initialise gave the vCPU, before its first entry. */
int bt_pv_load_context(struct bt_vcpu *b, struct hv_stop *stop)
{
    struct pv_regs r, old;
    char err[128];

    if (hv_vcpu_load_context(b->v, &r, err, sizeof(err)) < 0) {
        hv_stop_with(stop, HV_STOP_ERROR, 0, b->v->init_regs.rip, "%s", err);
        return -1;
    }
    read_regs(b, &old);
    old.gs_sel = ~0ULL;                 /* load %gs and its base whatever they hold */
    write_regs(b, &r, &old);
    return 0;
}

/* The hypercalls that touch nothing Unicorn holds but rax (no other register, no
 * mapping, TLB entry, descriptor table or control state), so that they can be done
 * while the emulator runs: the ones a running kernel makes most (events, timers,
 * scheduling, the console) and a few set-ups; for each, how many arguments it takes
 * (Xen's hypercall_args_table), as only those are read: 0 for the rest (the MMU's,
 * segment bases, iret and a multicall that may hold one, debug registers, CR0.TS),
 * which take the run loop's path, as every hypercall did before. */
static int hook_args(uint64_t nr)
{
    switch (nr) {
    case __HYPERVISOR_set_trap_table: case __HYPERVISOR_set_timer_op:
    case __HYPERVISOR_get_debugreg:
        return 1;
    case __HYPERVISOR_xen_version: case __HYPERVISOR_event_channel_op:
    case __HYPERVISOR_sched_op: case __HYPERVISOR_stack_switch:
    case __HYPERVISOR_callback_op: case __HYPERVISOR_physdev_op:
    case __HYPERVISOR_hvm_op: case __HYPERVISOR_vm_assist:
        return 2;
    case __HYPERVISOR_console_io: case __HYPERVISOR_vcpu_op:
    case __HYPERVISOR_set_callbacks:
        return 3;
    }
    return 0;
}

/* What the syscall hook reads first, enough to tell what the syscall is: rax (the
 * hypercall number), rip (at the syscall), rflags and CS. Each register read costs
 * (Unicorn's reg_read is a switch over all of them), so the hook reads these once and
 * the rest only for the path it takes. */
struct syscall_regs {
    uint64_t rax, rip, rflags, cs;
};

/* A hypercall from guest kernel mode, done inside the syscall hook as a ring-0
 * kernel's hypercall is (bt.c's `in` hook), without stopping and restarting the
 * emulator: 1 if done. Unicorn's hook sees rip at the syscall and adds its length
 * afterwards, which is where a hypercall returns, so only rax, rcx and r11 are
 * written. Not for the calls hook_args leaves out, the guest's user mode (its syscall
 * callback), or a CS that Xen's syscall would replace; events the call made
 * deliverable stop the emulator (bt_after_exit). */
static int syscall_in_hook(struct bt_vcpu *b, const struct syscall_regs *s)
{
    static const int arg_ids[] = { UC_X86_REG_RDI, UC_X86_REG_RSI, UC_X86_REG_RDX,
                                   UC_X86_REG_R10, UC_X86_REG_R8 };
    static const int out_ids[] = { UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_R11 };
    struct hv_vcpu *v = b->v;
    int nargs = hook_args(s->rax);

    if (v->pv.user_mode || b->pv_ss != FLAT_KERNEL_SS || !nargs || s->cs != FLAT_KERNEL_CS)
        return 0;
    struct hv_hcall h = { .nr = s->rax };
    void *args[] = { &h.a1, &h.a2, &h.a3, &h.a4, &h.a5 };
    uint64_t out[3];
    void *outs[] = { &out[0], &out[1], &out[2] };
    if (b->uc_regs) {                   /* the others stay 0 */
        static const uint8_t arg_slots[] = { UC_RDI, UC_RSI, UC_RDX, UC_R10, UC_R8 };
        for (int i = 0; i < nargs; i++)
            *(uint64_t *)args[i] = b->uc_regs[arg_slots[i]];
    } else {
        bt_uc.reg_read_batch(b->uc, arg_ids, args, nargs);
    }
    /* bringing a vCPU up or down: VCPUOP_initialise creates the vCPU's own Unicorn,
     * which must not happen inside a hook of this one, and up/down change who runs */
    if (h.nr == __HYPERVISOR_vcpu_op && (h.a1 == VCPUOP_initialise || h.a1 == VCPUOP_up ||
                                         h.a1 == VCPUOP_down))
        return 0;
    v->pv.syscalls++;
    v->dom->counters.exits[HV_EXIT_HYPERCALL]++;
    out[0] = (uint64_t)hv_hypercall(v, &h);
    out[1] = s->rip + 2;                /* what the CPU's syscall leaves */
    out[2] = s->rflags;
    if (b->uc_regs) {
        b->uc_regs[UC_RAX] = out[0];
        b->uc_regs[UC_RCX] = out[1];
        b->uc_regs[UC_R11] = out[2];
    } else {
        bt_uc.reg_write_batch(b->uc, out_ids, outs, 3);
    }
    bt_after_exit(b);
    return 1;
}

/* After a bounce or an iret done inside a hook: the run loop takes over where it
 * must step (TF, breakpoints, a mov-SS shadow), or where it has work. rflags: the
 * guest's, as just written. */
static void resume_or_stop(struct bt_vcpu *b, uint64_t rflags)
{
    /* nothing armed (DR7's enables, a data breakpoint's hook, a mov-SS shadow) and no
     * TF: the usual case, without asking bt_debug.c */
    if (!(b->v->pv.dr[7] & 0xff) && !b->db_mem_hook && !b->db_shadow_armed &&
        !(rflags & RFLAGS_TF))
        bt_after_delivery(b);
    else if (bt_debug_stepping_flags(b, rflags))
        bt_uc.emu_stop(b->uc);
    else
        bt_after_delivery(b);
}

/* A domain_crash met inside a hook: the run loop returns its stop first thing. */
static void stop_fatal(struct bt_vcpu *b, const struct hv_stop *stop)
{
    b->fatal = 1;
    b->fatal_stop = *stop;
    bt_uc.emu_stop(b->uc);
}

/* Inside the syscall hook, without stopping and restarting the emulator: the iret
 * hypercall from guest kernel mode (to the kernel, or to user mode), the end of every
 * bounce; and a guest user's syscall, bounced to the kernel's syscall callback (without
 * one it is a #UD, which the run loop's path raises). 1 if done. rip is at the syscall
 * here, and Unicorn adds the syscall's length to whatever rip the hook leaves, so the
 * new rip is written 2 short of where it goes (the block ends at the syscall, and its
 * next one is looked up at that rip: goto_regs). The model reads and writes only rax
 * (the iret restores it), rcx, r11, rip, rflags, rsp, CS and, where the mode switches,
 * the GS base here; rcx and r11 going in are what the CPU's syscall leaves. */
static int bounce_in_hook(struct bt_vcpu *b, const struct syscall_regs *s)
{
    const struct pv_vcpu *p = &b->v->pv;
    struct pv_regs r, old;
    struct hv_stop stop;
    int switches = p->user_mode;        /* between kernel and user mode: swaps GS bases */
    uint64_t rsp, gs_base = 0;
    struct iret_context frame;
    int rc;

    if (p->user_mode ? !p->callback[CALLBACKTYPE_syscall] : s->rax != __HYPERVISOR_iret)
        return 0;
    /* Where the guest will be traced (its TF now, or in the iret frame) or will change
     * between 64-bit and compat code (which bt switches by running an iret of its own),
     * the run loop does it: neither can happen inside a hook. */
    if ((s->rflags & RFLAGS_TF) || pv_compat_code(b->v, s->cs))
        return 0;
    rsp = b->uc_regs ? b->uc_regs[UC_RSP] : bt_reg(b, UC_X86_REG_RSP);
    if (!p->user_mode) {
        /* the frame, read as do_iret would, which then takes it from here */
        if (hv_copy_from_guest(b->v, &frame, rsp, sizeof(frame)) < 0 ||
            (frame.rflags & RFLAGS_TF) || pv_compat_code(b->v, frame.cs))
            return 0;
        switches = (frame.cs & 3) == 3; /* an iret to user mode (do_iret) */
    }
    if (switches)
        gs_base = gs_base_now(b);
    /* r and old the same, each filled as it is (no copy: see read_bounce_regs) */
    r = no_regs;
    old = no_regs;
    r.rsp = old.rsp = rsp;
    r.gs_base = old.gs_base = gs_base;
    r.rax = old.rax = s->rax;
    r.rip = old.rip = s->rip;
    r.rflags = old.rflags = s->rflags;
    r.cs = old.cs = s->cs;
    r.ss = old.ss = b->pv_ss;
    r.rip += 2;
    r.rcx = r.rip;                      /* what the CPU's syscall leaves */
    r.r11 = r.rflags;
    b->v->dom->counters.exits[HV_EXIT_HYPERCALL]++;
    b->v->pv.iret_frame = p->user_mode ? NULL : &frame;
    rc = pv_syscall(b->v, &r, &stop);
    b->v->pv.iret_frame = NULL;
    if (rc < 0 || pv_deliver_events(b->v, &r, &stop) < 0) {
        stop_fatal(b, &stop);
        return 1;
    }
    r.rip -= 2;                         /* Unicorn adds the syscall's length */
    old.rip = ~r.rip;                   /* written whatever it is, as rcx and r11, */
    old.rcx = ~r.rcx;                   /* which were not read, and rflags, which */
    old.r11 = ~r.r11;                   /* may have been read without its arithmetic */
    old.rflags = ~r.rflags;             /* flags (bt_pv_on_syscall) */
    if (!goto_regs(b, &r, &old, 0))
        write_regs(b, &r, &old);
    resume_or_stop(b, r.rflags);
    return 1;
}

/* The syscall hook: Unicorn runs no syscall of its own while it is there. The block
 * ends at a syscall, so the stop lands right after it. A single step (the run loop's)
 * takes the loop's path. */
void bt_pv_on_syscall(uc_engine *uc, void *user)
{
    static const int ids[] = { UC_X86_REG_RAX, UC_X86_REG_RIP, UC_X86_REG_RFLAGS,
                               UC_X86_REG_CS };
    struct bt_vcpu *b = user;
    struct syscall_regs s = { 0 };

    if (!b->stepping) {
        if (b->uc_regs) {
            s.rax = b->uc_regs[UC_RAX];
            s.rip = b->uc_regs[UC_RIP];
            /* the iret from kernel mode replaces rflags (and rcx and r11, where the
             * others put it): its control flags are all it reads of them, and the
             * arithmetic ones cost a computation each time */
            if (bt_uc.control_flags_cs && s.rax == __HYPERVISOR_iret && !b->v->pv.user_mode)
                bt_uc.control_flags_cs(b->uc, &s.rflags, &s.cs);
            else if (bt_uc.flags_cs)
                bt_uc.flags_cs(b->uc, &s.rflags, &s.cs);
            else
                bt_uc.reg_read_batch(b->uc, ids + 2, (void *[]){ &s.rflags, &s.cs }, 2);
        } else {
            bt_uc.reg_read_batch(b->uc, ids, (void *[]){ &s.rax, &s.rip, &s.rflags, &s.cs }, 4);
        }
        s.cs &= 0xffff;
        if (syscall_in_hook(b, &s) || bounce_in_hook(b, &s))
            return;
    }
    b->syscall_pending = 1;
    bt_uc.emu_stop(uc);
}

/* The sysenter hook: Unicorn, for a CPU whose CPUID says Intel (which runs sysenter in
 * long mode), calls it and moves on; as for syscall, the block ends there. */
void bt_pv_on_sysenter(uc_engine *uc, void *user)
{
    struct bt_vcpu *b = user;
    b->syscall_pending = 2;
    bt_uc.emu_stop(uc);
}

int bt_pv_syscall(struct bt_vcpu *b, int sysenter, struct hv_stop *stop)
{
    struct pv_regs r, old;
    uint8_t insn[2];

    read_regs(b, &r);
    old = r;                            /* Unicorn's rcx and r11 are the guest's own */
    /* Unicorn may stop before or after moving past it: find the instruction */
    if (bt_read_virt(b, r.rip, insn, 2) == 0 && insn[0] == 0x0f &&
        insn[1] == (sysenter ? 0x34 : 0x05))
        r.rip += 2;
    b->v->dom->counters.exits[HV_EXIT_HYPERCALL]++;
    if (sysenter) {
        /* sysenter leaves rcx and r11 alone; IF, VM and RF are cleared, and Xen sets
         * IF again in the frame */
        r.rflags &= ~(RFLAGS_VM | RFLAGS_RF);
        if (pv_sysenter(b->v, &r, stop) < 0 || pv_deliver_events(b->v, &r, stop) < 0)
            return -1;
        write_regs(b, &r, &old);
        return 0;
    }
    r.rcx = r.rip;                      /* what the CPU's syscall leaves */
    r.r11 = r.rflags;
    if (pv_syscall(b->v, &r, stop) < 0 || pv_deliver_events(b->v, &r, stop) < 0)
        return -1;
    write_regs(b, &r, &old);
    return 0;
}

static int canonical(uint64_t va)
{
    uint64_t top = va >> 47;
    return top == 0 || top == 0x1ffff;
}

static const int gpr_slot[16] = { 0, 2, 3, 1, 6, 7, 4, 5, 8, 9, 10, 11, 12, 13, 14, 15 };

/* A register operand's value: reg is the instruction's number (rax rcx rdx rbx rsp ..). */
static uint64_t gpr(const struct pv_regs *r, int reg)
{
    return (&r->rax)[gpr_slot[reg]];
}

/* The address of in's memory operand (in decoded at r->rip), with its FS/GS base:
 * 0, or -1 if it has none. *base is its base register, -1 if none, 16 for rip. */
static int operand_address(const struct pv_regs *r, const struct bt_insn *in, uint64_t *va,
                           int *base, int code32)
{
    int mod = in->modrm >> 6;
    uint64_t ea = 0;

    *base = -1;
    if (!in->has_modrm || mod == 3 || (code32 && in->addr32))
        return -1;                      /* no memory operand; 16-bit addressing */
    if ((in->modrm & 7) == 4) {
        int index = ((in->sib >> 3) & 7) | (in->rex & 2) << 2;
        if (!((in->sib & 7) == 5 && mod == 0)) {
            *base = (in->sib & 7) | (in->rex & 1) << 3;
            ea = gpr(r, *base);
        }
        if (index != 4)
            ea += gpr(r, index) << (in->sib >> 6);
    } else if ((in->modrm & 7) == 5 && mod == 0) {
        *base = in->disp_at_end_rel ? 16 : -1;      /* rip-relative; absolute in 32-bit code */
        ea = in->disp_at_end_rel ? r->rip + in->len : 0;
    } else {
        *base = (in->modrm & 7) | (in->rex & 1) << 3;
        ea = gpr(r, *base);
    }
    ea += (uint64_t)(int64_t)in->disp;
    if (in->addr32 || code32)
        ea = (uint32_t)ea;
    if (in->seg == 0x64)
        ea += r->fs_base;
    else if (in->seg == 0x65)
        ea += r->gs_base;
    *va = ea;
    return 0;
}

/* TCG raises #GP for every non-canonical address; the CPU raises #SS(0) when the
 * memory operand is a reference through SS (bt_stack_access: a base register of rsp or
 * rbp, no FS or GS override). 1 if the #GP(0) at r->rip is such a stack reference. */
static int stack_reference_fault(struct bt_vcpu *b, const struct pv_regs *r)
{
    uint8_t code[15];
    struct bt_insn in;
    int avail = sizeof(code), base;
    uint64_t ea;

    while (avail > 0 && bt_read_virt(b, r->rip, code, avail) < 0)
        avail--;
    if (avail == 0 || bt_decode_mode(code, avail, &in, bt_code32(b)) < 0 ||
        operand_address(r, &in, &ea, &base, bt_code32(b)) < 0)
        return 0;
    return (bt_stack_access(&in) & BT_STACK_OPERAND) && !canonical(ea);
}


/* The registers an exception's bounce needs: int3, into, int n from 32 up are a
 * bounce, or #GP(sel) and its bounce (read_bounce_regs); an int n below 32 may reach
 * the model's #UD, #GP or #PF emulation, which reads more, as faults do. 1 if all of
 * them were read (for goto_regs), 0 if a bounce's. */
static int read_exception_regs(struct bt_vcpu *b, const struct bt_event *ev, struct pv_regs *r,
                               struct pv_regs *old)
{
    if (ev->soft && (ev->vector == 3 || ev->vector == 4 || ev->vector >= 32)) {
        read_bounce_regs(b, r, old);
        return 0;
    }
    read_regs(b, r);
    *old = *r;
    return 1;
}

/* ev to the trap table, r holding the registers (rip past a software interrupt). */
static int exception_bounce(struct bt_vcpu *b, struct pv_regs *r, const struct bt_event *ev,
                            struct hv_stop *stop)
{
    int rc, vector = ev->vector;

    b->v->dom->counters.exits[HV_EXIT_EXCEPTION]++;
    if (vector == 13 && ev->has_error && ev->error == 0 && !ev->soft &&
        stack_reference_fault(b, r))
        vector = 12;
    if (ev->soft && ev->vector != 3 && ev->vector != 4) {
        r->rip -= 2;                    /* int imm8: the model wants it at the instruction */
        rc = pv_int_n(b->v, r, ev->vector, 2, stop);
    } else {
        rc = pv_exception(b->v, r, vector, ev->has_error ? ev->error : 0,
                          ev->set_cr2 ? ev->cr2 : 0, stop);
    }
    if (rc < 0 || pv_deliver_events(b->v, r, stop) < 0)
        return -1;
    return 0;
}

int bt_pv_exception(struct bt_vcpu *b, const struct bt_event *ev, struct hv_stop *stop)
{
    struct pv_regs r, old;

    read_exception_regs(b, ev, &r, &old);
    if (exception_bounce(b, &r, ev, stop) < 0)
        return -1;
    write_regs(b, &r, &old);
    return 0;
}

/* A software interrupt (int3, into, int n) bounced to the trap table inside the
 * interrupt hook, without stopping and restarting the emulator: 1 if done. Unicorn has
 * already moved rip past the instruction, as the model expects, and takes the rip the
 * hook leaves. Faults keep the run loop's path: their fix-ups (the #SS of a stack
 * reference, emulated #UD and #GP, #PF's cr2) read more than the registers. */
int bt_pv_soft_interrupt(struct bt_vcpu *b, const struct bt_event *ev)
{
    struct pv_regs r, old;
    struct hv_stop stop;
    int all;

    if (!ev->soft || b->stepping)
        return 0;
    all = read_exception_regs(b, ev, &r, &old);
    if (pv_compat_code(b->v, r.cs))
        return 0;                       /* compat code: the bounce switches mode (above) */
    if (exception_bounce(b, &r, ev, &stop) < 0) {
        stop_fatal(b, &stop);
        return 1;
    }
    if (!goto_regs(b, &r, &old, all))
        write_regs(b, &r, &old);
    resume_or_stop(b, r.rflags);
    return 1;
}

/* int3 and `int imm8` bounced in the code hook of their site, before TCG runs them:
 * 1 if done. TCG would raise the interrupt by leaving its translated code, and
 * Unicorn would hand it to the interrupt hook after it left; here the hook bounces it
 * and the write of rip makes Unicorn leave the block right after the hook, for the
 * new rip (goto_regs; without it, uc_reg_write's exit, which it notes must not sync
 * the pc back to the instruction). rip is at the
 * instruction here, and the model wants it past. Only 64-bit code, without prefixes
 * (into and prefixed forms keep TCG's way). */
int bt_pv_int_at_site(struct bt_vcpu *b, const struct bt_site *s)
{
    struct bt_event ev = { .soft = 1, .insn_len = s->len };
    struct pv_regs r, old;
    struct hv_stop stop;
    uint64_t rip;
    int all;

    if (b->stepping || bt_code32(b))
        return 0;
    if (s->len == 1 && s->bytes[0] == 0xcc)
        ev.vector = 3;
    else if (s->len == 2 && s->bytes[0] == 0xcd)
        ev.vector = s->bytes[1];
    else
        return 0;
    all = read_exception_regs(b, &ev, &r, &old);
    r.rip += (uint64_t)s->len;
    if (exception_bounce(b, &r, &ev, &stop) < 0) {
        stop_fatal(b, &stop);
        return 1;
    }
    if (!goto_regs(b, &r, &old, all)) {
        rip = r.rip;
        r.rip = old.rip;                /* rip on its own, below */
        write_regs(b, &r, &old);
        bt_uc.reg_write(b->uc, UC_X86_REG_RIP, &rip);
    }
    resume_or_stop(b, r.rflags);
    return 1;
}

/* popf in ring 3 with IOPL 0 changes neither IF nor IOPL, and does not trap. */
static int emulate_popf(struct bt_vcpu *b, struct pv_regs *r, const struct bt_site *s)
{
    const uint64_t mask = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x400 | 0x800 |
                          0x4000 | 0x40000 | 0x200000;
    struct bt_insn in;
    uint64_t value = 0;
    int width = bt_decode(s->bytes, s->len, &in) == 0 && in.opsize == 2 ? 2 : 8;

    if (bt_read_virt(b, r->rsp, &value, width) < 0)
        return 0;                       /* not readable: TCG runs it and faults */
    if (width == 2)
        value = (r->rflags & ~0xffffULL) | (value & 0xffff);
    r->rflags = (r->rflags & ~mask) | (value & mask);
    r->rsp += (uint64_t)width;
    r->rip += s->len;
    return 1;
}

static int ring3_code_segment(struct hv_vcpu *v, uint16_t sel, int *vector, uint32_t *error);

/* iret from ring 3 to ring 3: cannot change IF or IOPL, and needs a ring-3 code
 * segment; 64-bit code pops rip, cs, rflags, rsp and ss (of the operand size), compat
 * code only eip, cs and eflags (no ring change). The new CS may be compat code or
 * 64-bit code. 1 if done, 0 if the stack cannot be read (TCG faults), -1 with *vector
 * and *error for the fault. */
static int emulate_iret(struct bt_vcpu *b, struct pv_regs *r, const struct bt_site *s,
                        int *vector, uint32_t *error)
{
    uint64_t frame[5] = { 0 };          /* rip, cs, rflags, rsp, ss */
    struct bt_insn in;
    int code32 = bt_code32(b), width, n = code32 ? 3 : 5;
    uint64_t kept = RFLAGS_IF | RFLAGS_IOPL, flags;

    *vector = 13;
    *error = 0;
    if (bt_decode_mode(s->bytes, s->len, &in, code32) < 0)
        return -1;
    width = in.opsize;
    for (int i = 0; i < n; i++)
        if (bt_read_virt(b, r->rsp + (uint64_t)(i * width), &frame[i], width) < 0)
            return 0;
    if (ring3_code_segment(b->v, (uint16_t)frame[1], vector, error) < 0)
        return -1;
    if (width == 2)
        kept |= ~0xffffULL;             /* iretw: the low 16 bits only */
    flags = (frame[2] & ~kept & 0x3f7fd5ULL) | (r->rflags & kept) | 2;
    r->rip = frame[0];
    r->cs = frame[1] & 0xffff;
    r->rflags = flags;
    if (code32) {
        r->rsp = (uint32_t)(r->rsp + 3 * (uint64_t)width);
    } else {
        r->rsp = frame[3];
        if ((frame[4] & 3) == 3 && (frame[4] & 0xfffc))
            r->ss = frame[4] & 0xffff;
    }
    return 1;
}

/* wrfsbase/wrgsbase: #UD without CR4.FSGSBASE, #GP(0) for a non-canonical base. 1 if
 * done, -1 for the #GP, -2 for the #UD. */
static int emulate_wrsegbase(struct bt_vcpu *b, struct pv_regs *r, const struct bt_site *s)
{
    struct bt_insn in;
    uint64_t base;

    if (bt_decode(s->bytes, s->len, &in) < 0)
        return -1;
    if (!(b->v->pv.cr4 & PV_CR4_FSGSBASE))
        return -2;
    base = gpr(r, (in.modrm & 7) | (in.rex & 1) << 3);
    if (!(in.rex & 8))
        base = (uint32_t)base;
    if (!canonical(base))
        return -1;
    if (((in.modrm >> 3) & 7) == 2)
        r->fs_base = base;
    else
        r->gs_base = base;
    r->rip += s->len;
    return 1;
}

/* mov to SS, checked as the CPU does at CPL 3 (TCG would check it at its own ring 0,
 * where an RPL-3 selector is refused). 1 if done, 0 if the operand cannot be read (TCG
 * runs it and faults), -1 with *vector and *error for the fault. A load that succeeds
 * holds off interrupts and debug exceptions until the next instruction is done: its
 * data breakpoint hits wait in the shadow (bt_debug.c). Unicorn's SS keeps the flat
 * selector it has: in 64-bit mode a data segment's base and limit do not matter. */
static int emulate_load_ss(struct bt_vcpu *b, struct pv_regs *r, const struct bt_site *s,
                           int *vector, uint32_t *error)
{
    struct hv_vcpu *v = b->v;
    struct bt_insn in;
    uint64_t va, desc;
    uint32_t hits = 0;
    uint16_t sel;
    int base;

    *vector = 13;
    *error = 0;
    if (bt_decode_mode(s->bytes, s->len, &in, bt_code32(b)) < 0)
        return -1;
    if (operand_address(r, &in, &va, &base, bt_code32(b)) == 0) {
        if (!canonical(va) || bt_read_virt(b, va, &sel, 2) < 0)
            return 0;
        hits = pv_debug_data_hits(&b->v->pv, va, 2, 0);
    } else {
        sel = (uint16_t)gpr(r, (in.modrm & 7) | (in.rex & 1) << 3);
    }
    if ((sel & ~3u) == 0)
        return -1;                      /* a null SS is ring 0's only */
    *error = sel & ~3u;
    if ((sel & 3) != 3)
        return -1;                      /* RPL must be the CPL */
    if (sel & 4) {
        if ((uint64_t)(sel >> 3) >= v->pv.ldt_ents ||
            hv_copy_from_guest(v, &desc, v->pv.ldt_base + (sel & ~7u), 8) < 0)
            return -1;
    } else if (pv_gdt_descriptor(v, sel, &desc) < 0) {
        return -1;
    }
    /* a writable data segment (S=1, code=0, W=1) of DPL 3 */
    if (!((desc >> 44) & 1) || ((desc >> 43) & 1) || !((desc >> 41) & 1) ||
        ((desc >> 45) & 3) != 3)
        return -1;
    if (!((desc >> 47) & 1)) {
        *vector = 12;                   /* not present: #SS(selector) */
        return -1;
    }
    r->ss = sel;
    r->rip += s->len;
    b->db_shadow |= hits;
    b->db_shadow_armed = 1;
    return 1;
}

/* mov from SS to a register (zero-extended beyond 16-bit operands) or to 2 bytes of
 * memory. 1 if done, 0 if the store cannot be made (TCG runs it and faults). */
static int emulate_store_ss(struct bt_vcpu *b, struct pv_regs *r, const struct bt_site *s)
{
    struct bt_insn in;
    uint64_t va;
    uint16_t sel = (uint16_t)r->ss;
    int base;

    if (bt_decode_mode(s->bytes, s->len, &in, bt_code32(b)) < 0)
        return 0;
    if (operand_address(r, &in, &va, &base, bt_code32(b)) == 0) {
        if (!canonical(va) || hv_copy_to_guest(b->v, va, &sel, 2) < 0)
            return 0;
        b->db_hits |= pv_debug_data_hits(&b->v->pv, va, 2, 1);
    } else {
        uint64_t *reg = &(&r->rax)[gpr_slot[(in.modrm & 7) | (in.rex & 1) << 3]];
        *reg = in.opsize == 2 ? (*reg & ~0xffffULL) | sel : sel;
    }
    r->rip += s->len;
    return 1;
}

/* The code descriptor sel names, for a transfer to ring 3: 0, or -1 with *vector and
 * *error set for the fault (#GP(sel), #NP(sel) if not present). */
static int ring3_code_segment(struct hv_vcpu *v, uint16_t sel, int *vector, uint32_t *error)
{
    uint64_t desc;

    *vector = 13;
    *error = sel & ~3u;
    if ((sel & ~3u) == 0 || (sel & 3) != 3)
        return -1;                      /* null, or to an inner ring (RPL < CPL 3) */
    if (sel & 4) {
        if ((uint64_t)(sel >> 3) >= v->pv.ldt_ents ||
            hv_copy_from_guest(v, &desc, v->pv.ldt_base + (sel & ~7u), 8) < 0)
            return -1;
    } else if (pv_gdt_descriptor(v, sel, &desc) < 0) {
        return -1;
    }
    /* a code segment (S=1, code=1): DPL 3 unless conforming, which any DPL may be */
    if (!((desc >> 44) & 1) || !((desc >> 43) & 1) ||
        (!((desc >> 42) & 1) && ((desc >> 45) & 3) != 3))
        return -1;
    if (!((desc >> 47) & 1)) {
        *vector = 11;
        return -1;
    }
    return 0;
}

/* lret [imm16] from ring 3 to ring 3: pop rip and CS (operand size each), then imm16
 * more bytes. 1 if done, 0 if the stack cannot be read (TCG faults), -1 for a fault. */
static int emulate_far_ret(struct bt_vcpu *b, struct pv_regs *r, const struct bt_site *s,
                           int *vector, uint32_t *error)
{
    struct bt_insn in;
    uint64_t ip = 0, cs = 0;
    uint16_t imm = 0;
    int width;

    *vector = 13;
    *error = 0;
    if (bt_decode_mode(s->bytes, s->len, &in, bt_code32(b)) < 0)
        return -1;
    width = in.opsize;
    if (in.opcode == 0xca)
        memcpy(&imm, s->bytes + in.len - 2, 2);
    if (bt_read_virt(b, r->rsp, &ip, width) < 0 ||
        bt_read_virt(b, r->rsp + (uint64_t)width, &cs, width) < 0)
        return 0;
    if (ring3_code_segment(b->v, (uint16_t)cs, vector, error) < 0)
        return -1;
    r->rip = ip;
    r->cs = cs & 0xffff;
    r->rsp += 2 * (uint64_t)width + imm;
    return 1;
}

/* ljmp and lcall from ring 3 to a ring-3 code segment (TCG, at its own ring 0, would
 * refuse the RPL-3 selector): EA and 9A with a ptr16:16/32 (32-bit code), FF /5 and FF /3
 * through an m16:16/32, m16:64 with REX.W on Intel only (AMD reads m16:32 there). The
 * loaded CS gets RPL 3; a call pushes CS and the return address at the operand size.
 * 1 if done, 0 if the pointer or the stack cannot be reached (TCG faults), -1 with
 * *vector and *error for the fault. */
static int emulate_far_jmp(struct bt_vcpu *b, struct pv_regs *r, const struct bt_site *s,
                           int *vector, uint32_t *error)
{
    struct bt_insn in;
    int code32 = bt_code32(b), call, width, base;
    uint64_t ip = 0, va, next, sp, ret_cs = r->cs;
    uint32_t vendor[4];
    uint16_t sel = 0;

    *vector = 13;
    *error = 0;
    if (bt_decode_mode(s->bytes, s->len, &in, code32) < 0)
        return -1;
    call = in.opcode == 0x9a || (in.opcode == 0xff && ((in.modrm >> 3) & 7) == 3);
    width = in.opsize;
    pv_cpuid(b->v, 0, 0, vendor);
    if (width == 8 && vendor[1] == VENDOR_AMD_EBX)
        width = 4;
    if (in.opcode == 0xea || in.opcode == 0x9a) {
        memcpy(&ip, s->bytes + in.len - 2 - width, (size_t)width);
        memcpy(&sel, s->bytes + in.len - 2, 2);
    } else {
        if (operand_address(r, &in, &va, &base, code32) < 0)
            return 0;
        if (bt_read_virt(b, va, &ip, width) < 0 || bt_read_virt(b, va + (uint64_t)width, &sel, 2) < 0)
            return 0;
    }
    if (ring3_code_segment(b->v, sel | 3, vector, error) < 0)
        return -1;
    next = r->rip + in.len;
    if (code32)
        next = (uint32_t)next;
    if (call) {
        sp = r->rsp - 2 * (uint64_t)width;
        if (code32)
            sp = (uint32_t)sp;
        if (hv_copy_to_guest(b->v, sp, &next, (uint64_t)width) < 0 ||
            hv_copy_to_guest(b->v, sp + (uint64_t)width, &ret_cs, (uint64_t)width) < 0)
            return 0;
        r->rsp = sp;
    }
    r->rip = ip;
    r->cs = (uint64_t)(sel | 3);
    return 1;
}

int bt_pv_site(struct bt_vcpu *b, struct bt_site *s, struct hv_stop *stop)
{
    struct pv_regs r, old;
    int done = 0, gp_error = 0, vector = 13;
    uint32_t error = 0, db;
    uint64_t bounces = b->v->pv.bounces;

    read_regs(b, &r);
    old = r;
    b->db_hits = 0;
    if (s->kind == BT_POPF)
        done = emulate_popf(b, &r, s);
    else if (s->kind == BT_IRET)
        done = emulate_iret(b, &r, s, &vector, &error);
    else if (s->kind == BT_WRSEGBASE)
        done = emulate_wrsegbase(b, &r, s);
    else if (s->kind == BT_LOAD_SS)
        done = emulate_load_ss(b, &r, s, &vector, &error);
    else if (s->kind == BT_STORE_SS)
        done = emulate_store_ss(b, &r, s);
    else if (s->kind == BT_FAR_RET)
        done = emulate_far_ret(b, &r, s, &vector, &error);
    else if (s->kind == BT_FAR_JMP)
        done = emulate_far_jmp(b, &r, s, &vector, &error);
    else
        done = -1;                      /* privileged in ring 3: #GP(0) */
    if (done == 0) {
        b->skip_once = s;               /* unreadable stack: TCG raises the #PF */
        return 0;
    }
    b->v->dom->counters.exits[HV_EXIT_PRIV_INSN]++;
    if (done == -2 && pv_exception(b->v, &r, 6, 0, 0, stop) < 0)
        return -1;
    if (done == -1 && (s->kind == BT_LOAD_SS || s->kind == BT_FAR_RET ||
                       s->kind == BT_FAR_JMP || s->kind == BT_IRET)) {
        if (pv_exception(b->v, &r, vector, error, 0, stop) < 0)
            return -1;
    } else if (done == -1 && pv_exception(b->v, &r, 13, (uint32_t)gp_error, 0, stop) < 0) {
        return -1;
    }
    /* An instruction done here that went nowhere else (no bounce) ends as one TCG ran
     * would: a #DB trap for its data breakpoint hits, and for TF as it was before it
     * (a popf clearing TF still traps). A mov to SS holds both for one instruction. */
    db = b->db_hits | ((old.rflags & RFLAGS_TF) ? DR6_BS : 0);
    b->db_hits = 0;
    if (db && s->kind != BT_LOAD_SS && b->v->pv.bounces == bounces) {
        if (pv_inject_db(b->v, &r, db, stop) < 0)
            return -1;
    }
    write_regs(b, &r, &old);
    return 0;
}

int bt_pv_events(struct bt_vcpu *b, struct hv_stop *stop)
{
    struct pv_regs r, old;

    if (!pv_upcall_due(b->v))
        return 0;
    read_regs(b, &r);
    old = r;
    if (pv_deliver_events(b->v, &r, stop) < 0)
        return -1;
    write_regs(b, &r, &old);
    return 0;
}

/* Xen's pv_inject_DB (pv_debug.c), with the events due on the way back. */
int bt_pv_debug_exception(struct bt_vcpu *b, uint32_t dr6_bits, struct hv_stop *stop)
{
    struct pv_regs r, old;

    read_regs(b, &r);
    old = r;
    b->v->dom->counters.exits[HV_EXIT_EXCEPTION]++;
    if (pv_inject_db(b->v, &r, dr6_bits, stop) < 0 || pv_deliver_events(b->v, &r, stop) < 0)
        return -1;
    write_regs(b, &r, &old);
    return 0;
}

void bt_pv_get_regs(struct bt_vcpu *b, struct pv_regs *r)
{
    read_regs(b, r);
}

void bt_pv_set_regs(struct bt_vcpu *b, const struct pv_regs *r)
{
    struct pv_regs old;

    read_regs(b, &old);
    old.cs = old.gs_sel = ~0ULL;        /* load CS's mode and %gs whatever they hold */
    old.gs_base = ~r->gs_base;
    old.fs_base = ~r->fs_base;
    for (int i = 0; i < 18; i++)        /* and every register */
        (&old.rax)[i] = ~(&r->rax)[i];
    write_regs(b, r, &old);
}
