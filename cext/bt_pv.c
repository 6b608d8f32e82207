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
    uc_x86_mmr ldtr = { .selector = p->ldt_ents ? PV_LDT_SEL : 0, .base = PV_LDT_VA,
                        .limit = p->ldt_ents ? (uint32_t)(p->ldt_ents * 8 - 1) : 0,
                        .flags = p->ldt_ents ? 0x8200 : 0 };      /* present, type 2 */

    for (int i = 0; i < 6; i++)
        bt_set_reg(b, drs[i], vals[i]);
    bt_uc.reg_write(b->uc, UC_X86_REG_LDTR, &ldtr);
    p->hw_dirty = 0;
}

/* A new CS (a far return, iret, bounce). In 64-bit mode Unicorn's reg_write changes
 * only CS's selector, not the descriptor TCG runs with, which stays the flat 64-bit
 * one: right for every 64-bit code segment, wrong for a compat-mode one, which only a
 * far transfer by the CPU itself could load, and the CPU's would drop to its ring 3.
 * So compat mode stops the domain in one line instead of running 32-bit code as 64. */
static void set_code_selector(struct bt_vcpu *b, const struct pv_regs *r)
{
    bt_set_reg(b, UC_X86_REG_CS, r->cs);
    if (bt_code32(b) && !b->fatal) {
        b->fatal = 1;
        hv_stop_with(&b->fatal_stop, HV_STOP_FAULT, 0, r->rip, "compat mode (CS %#llx at "
                     "rip %#llx) is not supported by the bt engine for PV guests",
                     (unsigned long long)r->cs, (unsigned long long)r->rip);
    }
}

static void write_regs(struct bt_vcpu *b, const struct pv_regs *r, const struct pv_regs *old)
{
    const uint64_t *now = &r->rax, *was = &old->rax;
    for (int i = 0; i < 18; i++)
        if (now[i] != was[i])
            bt_set_reg(b, gpr_ids[i], now[i]);
    if (r->cs != old->cs)
        set_code_selector(b, r);
    if (r->gs_sel != old->gs_sel)
        bt_set_reg(b, UC_X86_REG_GS, r->gs_sel);     /* loads its base: set ours after */
    if (r->gs_base != old->gs_base || r->gs_sel != old->gs_sel)
        bt_set_reg(b, UC_X86_REG_GS_BASE, r->gs_base);
    if (r->fs_base != old->fs_base)
        bt_set_reg(b, UC_X86_REG_FS_BASE, r->fs_base);
    b->pv_ss = (uint16_t)r->ss;
    if (b->v->pv.hw_dirty)
        load_control(b);
}

int bt_pv_boot(struct bt_vcpu *b, const struct hv_boot_state *bs, char *err, int err_len)
{
    uc_x86_mmr gdtr = { .base = PV_GDT_VA, .limit = PV_GDT_LIMIT };
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
    pv_vcpu_boot(b->v, bs->rsp);
    return 0;
}

/* The syscall hook: Unicorn runs no syscall of its own while it is there. The block
 * ends at a syscall, so the stop lands right after it. */
void bt_pv_on_syscall(uc_engine *uc, void *user)
{
    struct bt_vcpu *b = user;
    b->syscall_pending = 1;
    bt_uc.emu_stop(uc);
}

int bt_pv_syscall(struct bt_vcpu *b, struct hv_stop *stop)
{
    struct pv_regs r, old;
    uint8_t insn[2];

    read_regs(b, &r);
    /* Unicorn may stop before or after moving past it: find the instruction */
    if (bt_read_virt(b, r.rip, insn, 2) == 0 && insn[0] == 0x0f && insn[1] == 0x05)
        r.rip += 2;
    old = r;
    r.rcx = r.rip;                      /* what the CPU's syscall leaves */
    r.r11 = r.rflags;
    b->v->dom->counters.exits[HV_EXIT_HYPERCALL]++;
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
                           int *base)
{
    int mod = in->modrm >> 6;
    uint64_t ea = 0;

    *base = -1;
    if (!in->has_modrm || mod == 3)
        return -1;
    if ((in->modrm & 7) == 4) {
        int index = ((in->sib >> 3) & 7) | (in->rex & 2) << 2;
        if (!((in->sib & 7) == 5 && mod == 0)) {
            *base = (in->sib & 7) | (in->rex & 1) << 3;
            ea = gpr(r, *base);
        }
        if (index != 4)
            ea += gpr(r, index) << (in->sib >> 6);
    } else if ((in->modrm & 7) == 5 && mod == 0) {
        *base = 16;
        ea = r->rip + in->len;
    } else {
        *base = (in->modrm & 7) | (in->rex & 1) << 3;
        ea = gpr(r, *base);
    }
    ea += (uint64_t)(int64_t)in->disp;
    if (in->addr32)
        ea = (uint32_t)ea;
    if (in->seg == 0x64)
        ea += r->fs_base;
    else if (in->seg == 0x65)
        ea += r->gs_base;
    *va = ea;
    return 0;
}

/* TCG raises #GP for every non-canonical address; the CPU raises #SS(0) when the
 * memory operand's base register is rsp or rbp (a stack reference), unless FS or GS
 * overrides it. 1 if the #GP(0) at r->rip is such a stack reference. */
static int stack_reference_fault(struct bt_vcpu *b, const struct pv_regs *r)
{
    uint8_t code[15];
    struct bt_insn in;
    int avail = sizeof(code), base;
    uint64_t ea;

    while (avail > 0 && bt_read_virt(b, r->rip, code, avail) < 0)
        avail--;
    if (avail == 0 || bt_decode(code, avail, &in) < 0 || in.seg ||
        operand_address(r, &in, &ea, &base) < 0)
        return 0;
    return (base == 4 || base == 5) && !canonical(ea);
}

int bt_pv_exception(struct bt_vcpu *b, const struct bt_event *ev, struct hv_stop *stop)
{
    struct pv_regs r, old;
    int rc, vector = ev->vector;

    read_regs(b, &r);
    old = r;
    b->v->dom->counters.exits[HV_EXIT_EXCEPTION]++;
    if (vector == 13 && ev->has_error && ev->error == 0 && !ev->soft &&
        stack_reference_fault(b, &r))
        vector = 12;
    if (ev->soft && ev->vector != 3 && ev->vector != 4) {
        r.rip -= 2;                     /* int imm8: the model wants it at the instruction */
        rc = pv_int_n(b->v, &r, ev->vector, 2, stop);
    } else {
        rc = pv_exception(b->v, &r, vector, ev->has_error ? ev->error : 0,
                          ev->set_cr2 ? ev->cr2 : 0, stop);
    }
    if (rc < 0 || pv_deliver_events(b->v, &r, stop) < 0)
        return -1;
    write_regs(b, &r, &old);
    return 0;
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

/* iretq from ring 3 to ring 3: cannot change IF or IOPL, and needs an RPL-3 CS. */
static int emulate_iretq(struct bt_vcpu *b, struct pv_regs *r, const struct bt_site *s,
                         int *gp_error)
{
    uint64_t frame[5];                  /* rip, cs, rflags, rsp, ss */
    if (bt_read_virt(b, r->rsp, frame, sizeof(frame)) < 0)
        return 0;
    if ((frame[1] & 3) != 3) {
        *gp_error = (int)(frame[1] & 0xfffc);
        return -1;
    }
    r->rip = frame[0];
    r->rflags = (frame[2] & ~(RFLAGS_IF | RFLAGS_IOPL) & 0x3f7fd5ULL) |
                (r->rflags & (RFLAGS_IF | RFLAGS_IOPL)) | 2;
    r->rsp = frame[3];
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
    if (bt_decode(s->bytes, s->len, &in) < 0)
        return -1;
    if (operand_address(r, &in, &va, &base) == 0) {
        if (!canonical(va) || bt_read_virt(b, va, &sel, 2) < 0)
            return 0;
        hits = bt_debug_data_hits(b, va, 2, 0);
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

    if (bt_decode(s->bytes, s->len, &in) < 0)
        return 0;
    if (operand_address(r, &in, &va, &base) == 0) {
        if (!canonical(va) || hv_copy_to_guest(b->v, va, &sel, 2) < 0)
            return 0;
        b->db_hits |= bt_debug_data_hits(b, va, 2, 1);
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
        done = emulate_iretq(b, &r, s, &gp_error);
    else if (s->kind == BT_WRSEGBASE)
        done = emulate_wrsegbase(b, &r, s);
    else if (s->kind == BT_LOAD_SS)
        done = emulate_load_ss(b, &r, s, &vector, &error);
    else if (s->kind == BT_STORE_SS)
        done = emulate_store_ss(b, &r, s);
    else if (s->kind == BT_FAR_RET)
        done = emulate_far_ret(b, &r, s, &vector, &error);
    else
        done = -1;                      /* privileged in ring 3: #GP(0) */
    if (done == 0) {
        b->skip_once = s;               /* unreadable stack: TCG raises the #PF */
        return 0;
    }
    b->v->dom->counters.exits[HV_EXIT_PRIV_INSN]++;
    if (done == -2 && pv_exception(b->v, &r, 6, 0, 0, stop) < 0)
        return -1;
    if (done == -1 && (s->kind == BT_LOAD_SS || s->kind == BT_FAR_RET)) {
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
        b->v->pv.dr[6] = (b->v->pv.dr[6] & ~0xfULL) | db;
        if (pv_exception(b->v, &r, 1, 0, 0, stop) < 0)
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

/* Xen's pv_inject_DB: B0-B3 are the CPU's for this #DB alone, BS and BD stay until the
 * guest clears them; the guest's handler reads the result with get_debugreg(6). */
int bt_pv_debug_exception(struct bt_vcpu *b, uint32_t dr6_bits, struct hv_stop *stop)
{
    struct pv_vcpu *p = &b->v->pv;
    struct pv_regs r, old;

    read_regs(b, &r);
    old = r;
    p->dr[6] = (p->dr[6] & ~0xfULL) | dr6_bits;
    b->v->dom->counters.exits[HV_EXIT_EXCEPTION]++;
    if (pv_exception(b->v, &r, 1, 0, 0, stop) < 0 || pv_deliver_events(b->v, &r, stop) < 0)
        return -1;
    write_regs(b, &r, &old);
    return 0;
}
