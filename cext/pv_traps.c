/*
 * pv_traps.c - how a Xen-model PV vCPU enters the hypervisor and how trapless hands
 * control back to the guest kernel: `syscall` (a hypercall from guest kernel mode, the
 * syscall callback from guest user mode), exceptions and event upcalls bounced to the
 * guest's trap table and callbacks, the iret hypercall, and the hypercalls that set
 * all of that up (set_trap_table, stack_switch, set_callbacks, callback_op).
 *
 * A bounce is Xen's (XEN-ABI-FACTS §19): a frame of rcx, r11, [error code], rip, cs
 * (the upcall mask saved in bits 32-39), rflags, rsp, ss on the guest kernel stack,
 * 16-byte aligned, taken from stack_switch's stack when the guest was in user mode
 * (which first switches it to kernel mode: page tables and GS bases). A bounce with
 * nowhere to go crashes the domain, with one line saying which vector at which rip.
 */
#include <stdarg.h>
#include <stdio.h>
#include <string.h>

#include "hv.h"

#define RFLAGS_TF   (1ULL << 8)
#define RFLAGS_IF   (1ULL << 9)
#define RFLAGS_DF   (1ULL << 10)
#define RFLAGS_IOPL (3ULL << 12)
#define RFLAGS_NT   (1ULL << 14)
#define RFLAGS_RF   (1ULL << 16)
#define RFLAGS_VM   (1ULL << 17)
#define RFLAGS_AC   (1ULL << 18)

#define DR6_BS      (1u << 14)

#define PF_P    (1u << 0)
#define PF_W    (1u << 1)
#define PF_U    (1u << 2)
#define PF_RSVD (1u << 3)

static const char *const vector_names[32] = {
    "#DE", "#DB", "NMI", "#BP", "#OF", "#BR", "#UD", "#NM", "#DF", "vector 9", "#TS", "#NP",
    "#SS", "#GP", "#PF", "vector 15", "#MF", "#AC", "#MC", "#XM", "#VE", "#CP",
};

static const char *vector_name(int vector, char *buf, size_t len)
{
    if (vector < 0)
        return "a callback";           /* an event upcall or a user syscall */
    if (vector < 32 && vector_names[vector])
        return vector_names[vector];
    snprintf(buf, len, "vector %d", vector);
    return buf;
}

int pv_has_error_code(int vector)
{
    return vector == 8 || (vector >= 10 && vector <= 14) || vector == 17 || vector == 21 ||
           vector == 29 || vector == 30;
}

static int canonical(uint64_t va)
{
    uint64_t top = va >> 47;
    return top == 0 || top == 0x1ffff;
}

/* Xen's domain_crash: the domain shuts down with reason crash; the stop says why. */
static int crash(struct hv_vcpu *v, struct hv_stop *stop, uint64_t rip, const char *fmt, ...)
    __attribute__((format(printf, 4, 5)));
static int crash(struct hv_vcpu *v, struct hv_stop *stop, uint64_t rip, const char *fmt, ...)
{
    char why[160];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(why, sizeof(why), fmt, ap);
    va_end(ap);
    hv_domain_shutdown(v->dom, SHUTDOWN_crash);
    hv_stop_with(stop, HV_STOP_SHUTDOWN, v->dom->shutdown_reason, rip, "domain_crash: %s", why);
    return -1;
}

/* Guest kernel mode <-> guest user mode: page tables and GS bases follow (not FS). */
static int switch_mode(struct hv_vcpu *v, struct pv_regs *r, int to_user)
{
    struct pv_vcpu *p = &v->pv;
    uint64_t gs = r->gs_base, l4 = to_user ? p->user_l4 : v->base_mfn;

    if (l4 == 0 || l4 == HV_NO_FRAME || v->ops->set_cr3(v, l4 << HV_PAGE_SHIFT) < 0)
        return -1;
    r->gs_base = p->gs_base_other;
    p->gs_base_other = gs;
    p->user_mode = to_user;
    return 0;
}

/* Build the bounce frame for an entry to `handler` and point the vCPU at it. */
static int bounce(struct hv_vcpu *v, struct pv_regs *r, uint64_t handler, int vector,
                  int has_error, uint32_t error, int mask_events, struct hv_stop *stop)
{
    struct pv_vcpu *p = &v->pv;
    struct vcpu_info *vi = hv_vcpu_info(v);
    uint8_t mask = __atomic_load_n(&vi->evtchn_upcall_mask, __ATOMIC_ACQUIRE);
    uint64_t frame[8], sp;
    int n = 0, from_user = p->user_mode;
    char name[16];

    /* RPL 0 in the saved CS tells the handler it interrupted the guest kernel */
    uint64_t cs = (from_user ? (r->cs | 3) : (r->cs & ~3ULL)) | (uint64_t)mask << 32;
    uint64_t flags = (r->rflags & ~(RFLAGS_IF | RFLAGS_IOPL)) | (mask ? 0 : RFLAGS_IF);
    if (p->vm_assist & (1ULL << VMASST_TYPE_architectural_iopl))
        flags |= (uint64_t)p->iopl << 12;       /* the frame shows the virtual IOPL */

    frame[n++] = r->rcx;
    frame[n++] = r->r11;
    if (has_error)
        frame[n++] = error;
    frame[n++] = r->rip;
    frame[n++] = cs;
    frame[n++] = flags;
    frame[n++] = r->rsp;
    frame[n++] = r->ss;

    if (from_user && switch_mode(v, r, 0) < 0)
        return crash(v, stop, r->rip, "%s at rip %#llx in user mode: no kernel page table",
                     vector_name(vector, name, sizeof(name)), (unsigned long long)r->rip);
    sp = ((from_user ? p->kernel_sp : r->rsp) & ~15ULL) - (uint64_t)n * 8;
    /* the frame may not reach into the hypervisor's range, nor fail to be written */
    if ((sp + (uint64_t)n * 8 > HYPERVISOR_VIRT_START && sp < HYPERVISOR_VIRT_END + 0x40) ||
        hv_copy_to_guest(v, sp, frame, (uint64_t)n * 8) < 0)
        return crash(v, stop, r->rip, "%s at rip %#llx: cannot write the bounce frame at %#llx",
                     vector_name(vector, name, sizeof(name)), (unsigned long long)r->rip,
                     (unsigned long long)sp);
    r->rsp = sp;
    r->rip = handler;
    r->cs = FLAT_KERNEL_CS;
    r->ss = FLAT_KERNEL_SS;
    r->rflags = (r->rflags & ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM | RFLAGS_AC)) |
                RFLAGS_IF;
    if (mask_events)
        __atomic_store_n(&vi->evtchn_upcall_mask, 1, __ATOMIC_RELEASE);
    p->bounces++;
    return 0;
}

/* Xen's ptwr is an mmu_update: under the domain's mm_lock like one. */
static int emulate_ptwr_locked(struct hv_vcpu *v, struct pv_regs *r, uint64_t cr2)
{
    int done;
    pthread_mutex_lock(&v->dom->mm_lock);
    done = pv_emulate_ptwr(v, r, cr2);
    pthread_mutex_unlock(&v->dom->mm_lock);
    return done;
}


int pv_exception(struct hv_vcpu *v, struct pv_regs *r, int vector, uint32_t error,
                 uint64_t cr2, struct hv_stop *stop)
{
    struct pv_vcpu *p = &v->pv;
    const struct pv_trap *t;
    char name[16];

    if (vector == 12 && error == 0)
        vector = pv_stack_fault_vector(v, r);
    t = &p->traps[vector & 255];

    /* An instruction Xen emulates ends as the CPU would end it: with a #DB trap after
     * it for the guest's TF (DR6.BS) and for the I/O breakpoints an in/out hit, both
     * through pv_inject_DB, unless it went elsewhere (int n bounces, TF cleared). */
    uint64_t bounces = p->bounces;
    uint32_t step = (r->rflags & RFLAGS_TF) ? DR6_BS : 0;
    if (vector == 6) {
        int done = pv_emulate_ud(v, r, stop);
        if (done < 0)
            return -1;
        if (done)
            return step && p->bounces == bounces ? pv_inject_db(v, r, step, stop) : 0;
    }
    if (vector == 13 && error == 0 && pv_emulate_gp(v, r)) {
        uint32_t hits = p->io_db_hits | step;
        p->io_db_hits = 0;
        return hits ? pv_inject_db(v, r, hits, stop) : 0;
    }
    if (vector == 13 && error == 0)
        error = pv_far_branch_error(v, r);
    if (vector == 7) {
        /* The CPU's TS is the guest's virtual one: Xen clears both and bounces #NM
         * only if the guest had set it (it restores its own FPU state first). */
        int guest_ts = p->cr0_ts;
        p->cr0_ts = 0;
        p->hw_dirty = 1;
        if (!guest_ts)
            return 0;
    }
    if (vector == 14 && !(error & PF_W) && pv_emulate_m2p_load(v, r, cr2))
        return 0;
    if (vector == 14 && (error & PF_W) && emulate_ptwr_locked(v, r, cr2))
        return 0;
    if (vector == 14) {
        /* The guest sees U set iff it was in user mode (both run in ring 3), and P
         * recomputed for the hypervisor's pages, where some hosts report it wrong. */
        error &= ~(PF_U | PF_RSVD);
        if (p->user_mode)
            error |= PF_U;
        uint64_t gpa;
        int ring3;
        if (cr2 >= HYPERVISOR_VIRT_START && cr2 < HYPERVISOR_VIRT_END)
            error = pv_region_walk(v->dom, cr2, &gpa, &ring3) == 0 ? error | PF_P : error & ~PF_P;
        __atomic_store_n(&hv_vcpu_info(v)->arch.cr2, cr2, __ATOMIC_RELEASE);
    }
    if (!t->address && pv_has_error_code(vector))
        return crash(v, stop, r->rip, "%s (vector %d, error %#x) at rip %#llx with no handler "
                     "in the trap table", vector_name(vector, name, sizeof(name)), vector,
                     error, (unsigned long long)r->rip);
    if (!t->address)
        return crash(v, stop, r->rip, "%s (vector %d) at rip %#llx with no handler in the "
                     "trap table", vector_name(vector, name, sizeof(name)), vector,
                     (unsigned long long)r->rip);
    return bounce(v, r, t->address, vector, pv_has_error_code(vector), error,
                  t->flags & TI_MASK_EVENTS, stop);
}

int pv_int_n(struct hv_vcpu *v, struct pv_regs *r, int n, int len, struct hv_stop *stop)
{
    const struct pv_trap *t = &v->pv.traps[n & 255];
    int needed = v->pv.user_mode ? 3 : 1;   /* the guest kernel counts as ring 1 */

    /* int $3 / int $4 use real DPL-3 gates (#BP, #OF); int $0x80 is bounced to its trap
     * table entry without a DPL check; any other vector needs the guest's DPL. */
    if (n == 3 || n == 4 || (n == 0x80 && t->address) ||
        (t->address && (t->flags & TI_DPL_MASK) >= needed)) {
        r->rip += (uint64_t)len;
        return pv_exception(v, r, n, 0, 0, stop);
    }
    return pv_exception(v, r, 13, (uint32_t)n * 8 + 2, 0, stop);
}

/* ---- events ---- */

int pv_upcall_due(struct hv_vcpu *v)
{
    struct vcpu_info *vi = hv_vcpu_info(v);
    return v->pv.callback[CALLBACKTYPE_event] &&
           __atomic_load_n(&vi->evtchn_upcall_pending, __ATOMIC_ACQUIRE) &&
           !__atomic_load_n(&vi->evtchn_upcall_mask, __ATOMIC_ACQUIRE);
}

int pv_deliver_events(struct hv_vcpu *v, struct pv_regs *r, struct hv_stop *stop)
{
    if (!pv_upcall_due(v))
        return 0;
    v->dom->counters.upcalls++;
    /* the event callback always masks events (flag ignored), like Xen */
    return bounce(v, r, v->pv.callback[CALLBACKTYPE_event], -1, 0, 0, 1, stop);
}

/* ---- syscall and the iret hypercall ---- */

static int do_iret(struct hv_vcpu *v, struct pv_regs *r, struct hv_stop *stop)
{
    struct iret_context c;
    struct vcpu_info *vi = hv_vcpu_info(v);

    v->dom->counters.hypercalls[__HYPERVISOR_iret]++;
    if (v->pv.iret_frame)
        c = *v->pv.iret_frame;
    else if (hv_copy_from_guest(v, &c, r->rsp, sizeof(c)) < 0)
        return crash(v, stop, r->rcx, "iret: cannot read the iret frame at rsp %#llx",
                     (unsigned long long)r->rsp);
    if ((c.cs & 3) == 3 && switch_mode(v, r, 1) < 0)
        return crash(v, stop, r->rcx, "iret to user mode (rip %#llx) without a user page table",
                     (unsigned long long)c.rip);
    if (v->pv.vm_assist & (1ULL << VMASST_TYPE_architectural_iopl))
        v->pv.iopl = (unsigned)(c.rflags >> 12) & 3;
    r->rip = c.rip;
    /* Xen's cpu_user_regs keeps 16 bits of each: the frame's CS slot carries the
     * saved upcall mask above them (bounce), which the new CS must not */
    r->cs = (c.cs | 3) & 0xffff;
    r->rflags = (c.rflags & ~(RFLAGS_IOPL | RFLAGS_VM)) | RFLAGS_IF | 2;
    r->rsp = c.rsp;
    r->ss = (c.ss | 3) & 0xffff;
    if (c.flags & VGCF_in_syscall) {
        r->rcx = r->rip;                /* as a sysret would leave them */
        r->r11 = r->rflags;
    } else {
        r->rcx = c.rcx;
        r->r11 = c.r11;
    }
    r->rax = c.rax;
    /* anything pending and unmasked now is delivered before the guest runs on */
    __atomic_store_n(&vi->evtchn_upcall_mask, (c.rflags & RFLAGS_IF) ? 0 : 1, __ATOMIC_RELEASE);
    return 0;
}

int pv_syscall(struct hv_vcpu *v, struct pv_regs *r, struct hv_stop *stop)
{
    struct pv_vcpu *p = &v->pv;

    /* Xen's cstar_enter bounces to the syscall32 callback from either mode: only a
     * 64-bit `syscall` from guest kernel mode is a hypercall (Xen's flat 64-bit
     * selector, the hypercalls' usual one, needs no descriptor lookup) */
    int compat = r->cs != FLAT_RING3_CS64 && pv_compat_code(v, r->cs);

    p->syscalls++;
    if (!p->user_mode && !compat) {
        /* A hypercall: rcx and r11 hold the return rip and rflags, as syscall left them. */
        struct hv_hcall h = { .nr = r->rax, .a1 = r->rdi, .a2 = r->rsi, .a3 = r->rdx,
                              .a4 = r->r10, .a5 = r->r8 };
        if (r->rax == __HYPERVISOR_iret)
            return do_iret(v, r, stop);
        int64_t ret;
        /* syscall loaded Xen's flat selectors (STAR), and Xen's sysret returns with
         * them: an event delivered on the way out sees 0xe033, whatever CS the
         * guest made the call from */
        r->cs = FLAT_KERNEL_CS;
        r->ss = FLAT_KERNEL_SS;
        p->regs = r;                    /* for the few that change registers */
        p->iret_done = 0;
        ret = hv_hypercall(v, &h);
        p->regs = NULL;
        if (p->iret_done)
            return 0;                   /* a multicall's iret: r is where it returned to */
        r->rax = (uint64_t)ret;
        r->rip = r->rcx;
        r->rflags = r->r11 | 2;
        return 0;
    }
    /* Xen's lstar_enter (64-bit code) or cstar_enter (compat mode) builds the frame
     * with fixed selectors, whatever the guest ran with, and switch_to_kernel picks
     * the syscall32 callback for the compat one. */
    uint64_t callback = p->callback[compat ? CALLBACKTYPE_syscall32 : CALLBACKTYPE_syscall];
    r->rip = r->rcx;
    r->rflags = r->r11 | 2;
    r->cs = compat ? FLAT_USER_CS32 : FLAT_KERNEL_CS;
    r->ss = compat ? FLAT_USER_SS32 : FLAT_KERNEL_SS;
    if (!callback) {
        r->rip -= 2;                    /* #UD at the syscall itself, DF kept */
        return pv_exception(v, r, 6, 0, 0, stop);
    }
    /* Both take their event mask from the syscall callback's flag: switch_to_kernel
     * tests VGCF_syscall_disables_events for either (the syscall32 flag Xen stores is
     * read only on the way in of a 32-bit PV domain, compat_syscall), so the code,
     * not the header's per-callback flag, decides here. */
    if (bounce(v, r, callback, -1, 0, 0,
               p->callback_flags[CALLBACKTYPE_syscall] & CALLBACKF_mask_events, stop) < 0)
        return -1;
    r->rflags &= ~RFLAGS_DF;
    return 0;
}

int pv_sysenter(struct hv_vcpu *v, struct pv_regs *r, struct hv_stop *stop)
{
    struct pv_vcpu *p = &v->pv;
    uint64_t callback = p->callback[CALLBACKTYPE_sysenter];

    /* Xen's sysenter_entry, from either mode: the CPU kept no return address, so the
     * frame says rip 0, CS 3 (a null ring-3 selector), rsp 0, SS FLAT_USER_SS; the
     * sysenter callback gets it, or #GP(0) does without one */
    p->syscalls++;
    r->rip = 0;
    r->cs = 3;
    r->rsp = 0;
    r->ss = FLAT_RING3_SS64;
    if (!callback)
        return pv_exception(v, r, 13, 0, 0, stop);
    return bounce(v, r, callback, -1, 0, 0,
                  p->callback_flags[CALLBACKTYPE_sysenter] & CALLBACKF_mask_events, stop);
}

/* iret as an entry of a multicall (a plain iret never reaches the table): it returns
 * the vCPU to the frame on the guest stack, like the hypercall itself, and ends the
 * multicall there, as Xen does since XSA-213; the entries after it do not run. */
int64_t do_iret_entry(struct hv_vcpu *v, const struct hv_hcall *h)
{
    struct pv_regs *r = v->pv.regs;
    struct hv_stop lost;

    if (v->dom->pv_model != HV_PV_XEN || !r)
        return -XEN_ENOSYS;
    r->rip = r->rcx;                    /* do_iret reads the frame at the guest's rsp */
    r->rflags = r->r11 | 2;
    v->pv.iret_done = 1;
    if (do_iret(v, r, &lost) < 0)
        return -XEN_EFAULT;             /* the domain crashed; the run loop stops it */
    v->dom->counters.hypercalls[__HYPERVISOR_iret]--;   /* hv_hypercall counts it */
    return (int64_t)r->rax;
}

/* ---- the hypercalls that set it up ---- */

int64_t do_set_trap_table(struct hv_vcpu *v, const struct hv_hcall *h)
{
    struct pv_vcpu *p = &v->pv;
    struct trap_info t;

    if (v->dom->pv_model != HV_PV_XEN)
        return -XEN_ENOSYS;
    if (!h->a1) {
        memset(p->traps, 0, sizeof(p->traps));   /* a null list clears every entry */
        return 0;
    }
    for (uint64_t at = h->a1;; at += sizeof(t)) {
        if (hv_copy_from_guest(v, &t, at, sizeof(t)) < 0)
            return -XEN_EFAULT;
        if (!t.address)
            return 0;
        if (!canonical(t.address))
            return -XEN_EINVAL;             /* the entries before it stay set */
        p->traps[t.vector].address = t.address;
        p->traps[t.vector].flags = t.flags;
    }
}

int64_t do_stack_switch(struct hv_vcpu *v, const struct hv_hcall *h)
{
    if (v->dom->pv_model != HV_PV_XEN)
        return -XEN_ENOSYS;
    v->pv.kernel_ss = h->a1 | 3;            /* selectors given to Xen get RPL 3 */
    v->pv.kernel_sp = h->a2;
    return 0;
}

static int register_callback(struct hv_vcpu *v, const struct callback_register *cb)
{
    struct pv_vcpu *p = &v->pv;

    if (!canonical(cb->address))
        return -XEN_EINVAL;
    switch (cb->type) {
    case CALLBACKTYPE_event:
    case CALLBACKTYPE_failsafe:
    case CALLBACKTYPE_syscall:
    case CALLBACKTYPE_syscall32:
    case CALLBACKTYPE_sysenter:
        p->callback[cb->type] = cb->address;
        p->callback_flags[cb->type] = cb->flags;
        return 0;
    case CALLBACKTYPE_nmi:
        /* the NMI callback is trap_table[2], and it masks events */
        p->traps[2].address = cb->address;
        p->traps[2].flags = TI_MASK_EVENTS;
        return 0;
    }
    return -XEN_ENOSYS;                     /* sysenter_deprecated and unknown types */
}

int64_t do_set_callbacks(struct hv_vcpu *v, const struct hv_hcall *h)
{
    struct callback_register cb = { .type = CALLBACKTYPE_event, .address = h->a1 };

    if (v->dom->pv_model != HV_PV_XEN)
        return -XEN_ENOSYS;
    /* Xen registers the three with flags 0 and ignores what each returns. */
    register_callback(v, &cb);
    cb.type = CALLBACKTYPE_failsafe;
    cb.address = h->a2;
    register_callback(v, &cb);
    cb.type = CALLBACKTYPE_syscall;
    cb.address = h->a3;
    register_callback(v, &cb);
    return 0;
}

int64_t do_callback_op(struct hv_vcpu *v, const struct hv_hcall *h)
{
    struct callback_register reg;
    struct callback_unregister unreg;

    if (v->dom->pv_model != HV_PV_XEN)
        return -XEN_ENOSYS;
    switch ((int32_t)h->a1) {
    case CALLBACKOP_register:
        if (hv_copy_from_guest(v, &reg, h->a2, sizeof(reg)) < 0)
            return -XEN_EFAULT;
        return register_callback(v, &reg);
    case CALLBACKOP_unregister:
        if (hv_copy_from_guest(v, &unreg, h->a2, sizeof(unreg)) < 0)
            return -XEN_EFAULT;
        switch (unreg.type) {
        case CALLBACKTYPE_nmi:
            v->pv.traps[2].address = 0;
            return 0;
        case CALLBACKTYPE_event:
        case CALLBACKTYPE_failsafe:
        case CALLBACKTYPE_syscall:
        case CALLBACKTYPE_syscall32:
        case CALLBACKTYPE_sysenter:
            return -XEN_EINVAL;             /* Xen keeps these once registered */
        }
        return -XEN_ENOSYS;
    }
    return -XEN_ENOSYS;
}
