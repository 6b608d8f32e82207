/*
 * vcpu_op.c - a domain's other vCPUs: VCPUOP_initialise, up, down and is_up (Xen's
 * common_vcpu_op and, for a 64-bit PV guest, arch_set_info_guest).
 *
 * vCPU 0 is initialised and started by the domain builder. Every other vCPU the domain
 * has (vcpus=) exists from the start, down and uninitialised: VCPUOP_initialise checks a
 * vcpu_guest_context and makes it the vCPU's state, once; VCPUOP_up (or VGCF_online)
 * hands it to the scheduler, and its engine loads that state on its own thread before
 * it first enters the guest (hv_vcpu_load_context). Each vCPU has its own GDT, TSS,
 * ring-0 stack and LDT mapping in the hypervisor's region (pv_region.c).
 */
#include <stdlib.h>
#include <string.h>

#include "hv.h"

#define X86_EFLAGS_IF    0x200ULL
#define X86_EFLAGS_IOPL  0x3000ULL
#define X86_EFLAGS_ALL   0x3f7fd5ULL    /* Xen's X86_EFLAGS_ALL: the bits a guest may set */
#define X86_EFLAGS_MBS   0x2ULL         /* bit 1 is always set */

static int canonical(uint64_t va)
{
    return (uint64_t)((int64_t)(va << 16) >> 16) == va;
}

/* Xen's __addr_ok for a 64-bit PV guest: a guest address, not in Xen's range. */
static int guest_address(uint64_t va)
{
    return va < (1ULL << 47) || va >= HYPERVISOR_VIRT_END;
}

/* The checks of Xen's arch_set_info_guest that come before anything changes. */
static int check_context(const struct vcpu_guest_context *c)
{
    if (c->debugreg[6] >> 32 || c->debugreg[7] >> 32)
        return -XEN_EINVAL;
    for (int i = 0; i < 4; i++)
        if (!guest_address(c->debugreg[i]))
            return -XEN_EINVAL;
    if (!canonical(c->user_regs.rip) || !canonical(c->user_regs.rsp) ||
        !canonical(c->kernel_sp) || (c->ldt_ents && !canonical(c->ldt_base)) ||
        !canonical(c->fs_base) || !canonical(c->gs_base_kernel) ||
        !canonical(c->gs_base_user) || !canonical(c->event_callback_eip) ||
        !canonical(c->syscall_callback_eip) || !canonical(c->failsafe_callback_eip))
        return -XEN_EINVAL;
    for (int i = 0; i < 256; i++)
        if (!canonical(c->trap_ctxt[i].address))
            return -XEN_EINVAL;
    if (!guest_address(c->ldt_base) || (c->ldt_base & (HV_PAGE_SIZE - 1)) ||
        c->ldt_ents > 8192)
        return -XEN_EINVAL;
    if ((c->gdt_ents + 511) / 512 > FIRST_RESERVED_GDT_PAGE)    /* Xen's gdt_frames[] */
        return -XEN_EINVAL;
    /* guest user mode needs a user L4 to run on */
    if (!(c->flags & VGCF_in_kernel) && !c->ctrlreg[1])
        return -XEN_EINVAL;
    return 0;
}

/* Xen's arch_set_info_guest for a vCPU never initialised (t, not running): its page
 * tables (the kernel L4 at ctrlreg[3], validated and typed as Xen's
 * get_page_type(PGT_root_page_table) does, and the user L4 at ctrlreg[1]) and GDT, then
 * the rest of its state. On failure nothing has changed. */
static int64_t set_context(struct hv_vcpu *t, const struct vcpu_guest_context *c)
{
    struct hv_domain *d = t->dom;
    struct pv_vcpu *p = &t->pv;
    uint64_t kernel_l4 = c->ctrlreg[3] >> HV_PAGE_SHIFT, user_l4 = c->ctrlreg[1] >> HV_PAGE_SHIFT;
    int rc = check_context(c);

    if (rc)
        return rc;

    memset(p, 0, sizeof(*p));
    p->xcr0 = PV_XCR0_X87;              /* the reset value, as vCPU 0's (pv_vcpu_boot) */
    rc = pv_set_gdt(t, c->gdt_frames, c->gdt_ents, 0);
    if (rc)
        return rc;
    /* Xen: the kernel L4 must be a frame of the domain (-EINVAL), then take the type */
    rc = kernel_l4 < d->mm.nr_pages ? hv_mm_get_table(d, kernel_l4, HV_FT_L4) : -XEN_EINVAL;
    if (rc == 0 && user_l4) {
        rc = user_l4 < d->mm.nr_pages ? hv_mm_get_table(d, user_l4, HV_FT_L4) : -XEN_EINVAL;
        if (rc)
            hv_mm_put_table(d, kernel_l4);
    }
    if (rc) {
        pv_drop_gdt(t);
        return rc;
    }
    t->base_mfn = kernel_l4;
    p->user_l4 = user_l4;

    p->user_mode = !(c->flags & VGCF_in_kernel);
    for (int i = 0; i < 256; i++) {
        p->traps[i].address = c->trap_ctxt[i].address;
        p->traps[i].flags = c->trap_ctxt[i].flags & (TI_DPL_MASK | TI_MASK_EVENTS);
    }
    p->callback[CALLBACKTYPE_event] = c->event_callback_eip;
    p->callback[CALLBACKTYPE_failsafe] = c->failsafe_callback_eip;
    p->callback[CALLBACKTYPE_syscall] = c->syscall_callback_eip;
    if (c->flags & VGCF_failsafe_disables_events)
        p->callback_flags[CALLBACKTYPE_failsafe] = CALLBACKF_mask_events;
    if (c->flags & VGCF_syscall_disables_events)
        p->callback_flags[CALLBACKTYPE_syscall] = CALLBACKF_mask_events;
    p->kernel_ss = c->kernel_ss;
    p->kernel_sp = c->kernel_sp;
    /* the LDT is mapped on the vCPU's first run, as Xen maps it on first use */
    p->ldt_base = c->ldt_ents ? c->ldt_base : 0;
    p->ldt_ents = c->ldt_ents;
    /* vm_assist is the domain's: vCPU 0's (Xen takes it from vCPU 0's context only) */
    p->vm_assist = d->vcpus[0] ? d->vcpus[0]->pv.vm_assist : 0;
    p->cr0_ts = (c->ctrlreg[0] & PV_CR0_TS) != 0;
    pv_write_cr(t, 4, c->ctrlreg[4]);   /* never fails: bits it may not have are dropped */
    /* Xen's start-of-day DRs, then the context's through set_debugreg, whose own
     * refusals leave the default (Xen ignores its result here too) */
    p->dr[6] = 0xffff0ff0;
    p->dr[7] = 0x400;
    for (int i = 0; i < 4; i++)
        pv_set_debugreg(t, i, c->debugreg[i]);
    pv_set_debugreg(t, 6, c->debugreg[6]);
    pv_set_debugreg(t, 7, c->debugreg[7]);

    t->init_regs = c->user_regs;
    t->init_regs.rflags = (c->user_regs.rflags & X86_EFLAGS_ALL) | X86_EFLAGS_MBS;
    p->iopl = (unsigned)((t->init_regs.rflags & X86_EFLAGS_IOPL) >> 12);    /* virtualised */
    t->init_regs.rflags = (t->init_regs.rflags & ~X86_EFLAGS_IOPL) | X86_EFLAGS_IF;
    t->init_fs_base = c->fs_base;
    t->init_gs_base = p->user_mode ? c->gs_base_user : c->gs_base_kernel;
    p->gs_base_other = p->user_mode ? c->gs_base_kernel : c->gs_base_user;
    t->initialised = 1;
    /* Xen's VGCF_online: up at once */
    if ((c->flags & VGCF_online) && hv_vcpu_bring_up(t) < 0)
        return -XEN_EINVAL;             /* the domain is ending */
    return 0;
}

int hv_vcpu_load_context(struct hv_vcpu *v, struct pv_regs *r, char *err, int err_len)
{
    const struct xen_user_regs *u = &v->init_regs;
    struct pv_vcpu saved = v->pv;
    uint64_t l4 = saved.user_mode ? saved.user_l4 : v->base_mfn;
    struct hv_boot_state bs = {
        .rip = u->rip, .rsp = u->rsp, .rsi = u->rsi, .cr3 = l4 << HV_PAGE_SHIFT,
        .code_selector = saved.user_mode ? FLAT_RING3_CS64 : FLAT_KERNEL_CS,
        .data_selector = FLAT_KERNEL_SS, .mode = HV_BOOT_LONG,
    };

    v->context_pending = 0;
    /* the engine's start of day (ring 3, the vCPU's own GDT and TSS, upcalls masked as
     * Xen's vcpu_info starts), then the context's PV state over its defaults */
    if (v->dom->engine->set_boot_state(v, &bs, err, err_len) < 0)
        return -1;
    v->pv = saved;
    v->pv.hw_dirty = 1;
    pv_map_gdt(v, saved.gdt_frames, saved.gdt_nr_frames);
    memset(r, 0, sizeof(*r));
    r->rax = u->rax; r->rbx = u->rbx; r->rcx = u->rcx; r->rdx = u->rdx;
    r->rsi = u->rsi; r->rdi = u->rdi; r->rsp = u->rsp; r->rbp = u->rbp;
    r->r8 = u->r8; r->r9 = u->r9; r->r10 = u->r10; r->r11 = u->r11;
    r->r12 = u->r12; r->r13 = u->r13; r->r14 = u->r14; r->r15 = u->r15;
    r->rip = u->rip;
    r->rflags = u->rflags;
    r->cs = bs.code_selector;
    r->ss = bs.data_selector;
    r->fs_base = v->init_fs_base;
    r->gs_base = v->init_gs_base;
    if (saved.ldt_ents && pv_set_ldt(v, saved.ldt_base, saved.ldt_ents) < 0) {
        hv_set_error(err, err_len, "vCPU %d: its LDT cannot be mapped", v->id);
        return -1;
    }
    return 0;
}

static int64_t vcpu_initialise(struct hv_vcpu *v, struct hv_vcpu *t, uint64_t arg)
{
    struct hv_domain *d = v->dom;
    struct vcpu_guest_context *c;
    char why[128];
    int64_t rc;

    if (d->guest_type != HV_GUEST_PV || d->pv_model != HV_PV_XEN)
        return -XEN_ENOSYS;             /* PVH's vcpu_hvm_context, ring-0 PV: not built */
    c = malloc(sizeof(*c));
    if (!c)
        return -XEN_ENOMEM;
    if (hv_copy_from_guest(v, c, arg, sizeof(*c)) < 0) {
        free(c);
        return -XEN_EFAULT;
    }
    pthread_mutex_lock(&d->vcpu_lock);
    if (t->initialised)
        rc = -XEN_EEXIST;
    else if (hv_vcpu_engine_ready(t, why, sizeof(why)) < 0)
        rc = -XEN_ENOMEM;               /* no host memory (or KVM vCPU) for it */
    else
        rc = set_context(t, c);
    pthread_mutex_unlock(&d->vcpu_lock);
    free(c);
    return rc;
}

/* Xen: an uninitialised vCPU cannot come up (-EINVAL); one that is up stays so (0). */
static int64_t vcpu_up(struct hv_vcpu *t)
{
    int64_t rc;
    pthread_mutex_lock(&t->dom->vcpu_lock);
    if (!t->initialised)
        rc = -XEN_EINVAL;
    else if (!t->down)
        rc = 0;
    else
        rc = hv_vcpu_bring_up(t) < 0 ? -XEN_EINVAL : 0;     /* -1: the domain is ending */
    pthread_mutex_unlock(&t->dom->vcpu_lock);
    return rc;
}

/* Xen: taking down the last vCPU that is up powers the domain off; any other leaves
 * the guest at its next entry and waits, parked, for VCPUOP_up. */
static int64_t vcpu_down(struct hv_vcpu *t)
{
    struct hv_domain *d = t->dom;
    int others_up = 0;

    pthread_mutex_lock(&d->vcpu_lock);
    for (int i = 0; i < HV_MAX_VCPUS; i++)
        if (d->vcpus[i] && d->vcpus[i] != t && !d->vcpus[i]->down)
            others_up = 1;
    if (others_up)
        __atomic_store_n(&t->down, 1, __ATOMIC_SEQ_CST);
    pthread_mutex_unlock(&d->vcpu_lock);
    if (!others_up)
        hv_domain_shutdown(d, SHUTDOWN_poweroff);
    else
        hv_vcpu_notify(t);              /* out of the guest if it runs elsewhere */
    return 0;
}

static int64_t vcpu_is_up(struct hv_vcpu *t)
{
    int up;
    pthread_mutex_lock(&t->dom->vcpu_lock);
    up = !t->down;
    pthread_mutex_unlock(&t->dom->vcpu_lock);
    return up;
}

/* The vCPU-life sub-ops of do_vcpu_op (timers.c), for the target vCPU t. */
int64_t hv_vcpu_life_op(struct hv_vcpu *v, int cmd, struct hv_vcpu *t, uint64_t arg)
{
    switch (cmd) {
    case VCPUOP_initialise:
        return vcpu_initialise(v, t, arg);
    case VCPUOP_up:
        return vcpu_up(t);
    case VCPUOP_down:
        return vcpu_down(t);
    case VCPUOP_is_up:
        return vcpu_is_up(t);
    }
    return -XEN_ENOSYS;
}
