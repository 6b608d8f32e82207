/*
 * bt_cpu.c - the parts of an x86-64 CPU the bt engine provides itself, because Unicorn
 * leaves them to its user: the MMU walk that fills TCG's TLB (so a refused access is a
 * precise #PF with its error code), and the delivery of exceptions and interrupts
 * through the guest's IDT (Unicorn has no interrupt controller and never enters an IDT).
 *
 * Delivery follows the 64-bit rules for a guest kernel in ring 0 with its user code in
 * ring 3: the gate is a present 64-bit interrupt or trap gate to a ring-0 code selector;
 * `int n`, int3 and into also need a gate DPL of at least the current ring. The frame
 * (ss, rsp, rflags, cs, rip, error code) goes on the current stack (from ring 0), the
 * stack TSS.RSP0 names (from ring 3), or the IST stack the gate names, aligned down to
 * 16 bytes; from ring 3, SS becomes the NULL selector. TF, NT, RF (and VM) clear; an
 * interrupt gate clears IF too. A fault met while delivering escalates as on hardware:
 * a contributory fault during a contributory one (or a #PF during a #PF or a
 * contributory fault) becomes #DF, and a fault during #DF is a triple fault.
 */
#include <stdio.h>
#include <string.h>

#include "bt.h"

#define PTE_P    (1ULL << 0)
#define PTE_RW   (1ULL << 1)
#define PTE_US   (1ULL << 2)
#define PTE_PS   (1ULL << 7)
#define PTE_NX   (1ULL << 63)
#define PTE_ADDR 0x000ffffffffff000ULL

#define CR0_PG   (1ULL << 31)
#define CR0_WP   (1ULL << 16)
#define EFER_NXE (1ULL << 11)
#define MSR_EFER 0xc0000080

#define PF_P     (1u << 0)
#define PF_W     (1u << 1)
#define PF_U     (1u << 2)
#define PF_RSVD  (1u << 3)
#define PF_I     (1u << 4)

uint64_t bt_reg(struct bt_vcpu *b, int regid)
{
    uint64_t value = 0;
    bt_uc.reg_read(b->uc, regid, &value);
    return value;
}

/* Unicorn's uc_reg_write of rip also notes that its next exit from translated code
 * must not sync the pc from the host's return address, which is right inside
 * translated code (the syscall hook) but not in the interrupt hook, which runs outside
 * it: a note left over could outlive the exit it was for. Its batch write moves rip
 * without that note. */
void bt_set_reg(struct bt_vcpu *b, int regid, uint64_t value)
{
    if (regid == UC_X86_REG_RIP && b->in_intr_hook) {
        void *vals[] = { &value };
        bt_uc.reg_write_batch(b->uc, &regid, vals, 1);
        return;
    }
    bt_uc.reg_write(b->uc, regid, &value);
}

static uint64_t efer(struct bt_vcpu *b)
{
    uc_x86_msr msr = { .rid = MSR_EFER };
    bt_uc.reg_read(b->uc, UC_X86_REG_MSR, &msr);
    return msr.value;
}

static int canonical(uint64_t va)
{
    uint64_t top = va >> 47;
    return top == 0 || top == 0x1ffff;
}

/* The walker's side effects: Accessed in every entry it used, Dirty in the last one
 * for a write. A translation for a read of a page not dirty yet is not writable in
 * TCG's TLB, so that the first store comes back here and sets Dirty. */
#define PTE_A (1ULL << 5)
#define PTE_D (1ULL << 6)
static void set_accessed_dirty(struct hv_domain *d, const uint64_t *at, int levels, int write,
                               int *perms)
{
    for (int i = 0; i < levels; i++) {
        uint64_t *e = (uint64_t *)(d->ram + at[i]), want = PTE_A;
        if (i == levels - 1) {
            if (write)
                want |= PTE_D;
            else if (!(__atomic_load_n(e, __ATOMIC_RELAXED) & PTE_D))
                *perms &= ~UC_PROT_WRITE;
        }
        if ((__atomic_load_n(e, __ATOMIC_RELAXED) & want) != want)
            __atomic_fetch_or(e, want, __ATOMIC_RELAXED);
    }
}

/* Translate va for an access (UC_MEM_READ/WRITE/FETCH) as the MMU would: 0 with the
 * guest-physical page and the permissions the whole walk grants (UC_PROT_*), or -1 with
 * *present saying whether a translation exists at all. The walk reads the page tables
 * straight from guest RAM and never leaves it. */
uint64_t bt_cr3(struct bt_vcpu *b)
{
    return b->cr3_known ? b->cr3 : bt_reg(b, UC_X86_REG_CR3);
}

int bt_write_cr3(struct bt_vcpu *b, uint64_t cr3)
{
    if (bt_uc.reg_write(b->uc, UC_X86_REG_CR3, &cr3) != UC_ERR_OK)
        return -1;
    b->cr3 = cr3;
    b->cr3_known = b->v->dom->pv_model == HV_PV_XEN;
    return 0;
}

int bt_walk(struct bt_vcpu *b, uint64_t va, int access, uint64_t *gpa, int *perms, int *present)
{
    struct hv_domain *d = b->v->dom;
    /* Xen's PV model: the guest kernel is in ring 3 too (Unicorn runs it in ring 0),
     * and paging with NX is on for good (bt_set_boot_state; the guest's writes of CR0
     * and EFER are the model's, which changes CR0.TS only): no register to read but
     * cr3, which bt_cr3 knows. Each register read costs, and a bounce walks several
     * times. kernel_view: the CPU's own accesses of a delivery (IDT, TSS, the new
     * stack) are ring 0's whatever ring was running. */
    int xen_pv = d->pv_model == HV_PV_XEN;
    uint64_t cr0 = xen_pv ? CR0_PG : bt_reg(b, UC_X86_REG_CR0), table, entry = 0;
    int user = xen_pv || ((bt_reg(b, UC_X86_REG_CS) & 3) == 3 && !b->kernel_view);
    int writable = 1, executable = 1, user_ok = 1, nx, levels = 0;
    uint64_t at_level[4];           /* where each entry of the walk is, for A and D */

    *present = 0;
    b->walk_rsvd = 0;
    if (d->pv_region && pv_xen_l4_slot((int)((va >> 39) & 511)) && (va >> 48) == 0xffff) {
        /* the hypervisor's slots, read-only: the M2P, and the GDT Unicorn reads itself */
        int ring3;
        if (pv_region_walk(d, va, gpa, &ring3) < 0)
            return -1;
        *present = 1;
        *perms = UC_PROT_READ;
        return access == UC_MEM_READ ? 0 : -1;
    }
    if (!(cr0 & CR0_PG)) {
        *gpa = va & ~(HV_PAGE_SIZE - 1);
        *perms = UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC;
        *present = 1;
        return 0;
    }
    if (!canonical(va))
        return -1;
    nx = xen_pv || (efer(b) & EFER_NXE) != 0;
    if (!b->rsvd_addr_bits) {
        /* an entry's address bits at and above MAXPHYADDR (the guest's CPUID) are
         * reserved: the CPU's walk stops with #PF, P and RSVD set */
        uint32_t r[4];
        unsigned maxphys;
        bt_guest_cpuid(b, 0x80000008, 0, r);
        maxphys = r[0] & 0xff;
        if (maxphys < 32 || maxphys > 52)
            maxphys = 36;
        b->rsvd_addr_bits = PTE_ADDR & ~((1ULL << maxphys) - 1);
    }
    table = bt_cr3(b) & PTE_ADDR;
    for (int level = 4; level >= 1; level--) {
        unsigned shift = 12 + 9 * (level - 1);
        uint64_t at = table + ((va >> shift) & 511) * 8;
        if (!hv_gpa_valid(d, at, 8))
            return -1;
        memcpy(&entry, d->ram + at, 8);
        if (!(entry & PTE_P))
            return -1;
        if (entry & b->rsvd_addr_bits) {
            b->walk_rsvd = 1;
            *present = 1;
            return -1;
        }
        at_level[levels++] = at;
        writable &= (entry & PTE_RW) != 0;
        user_ok &= (entry & PTE_US) != 0;
        if (nx && (entry & PTE_NX))
            executable = 0;
        if ((level == 3 || level == 2) && (entry & PTE_PS)) {
            uint64_t size = 1ULL << shift;
            *gpa = ((entry & PTE_ADDR) & ~(size - 1)) | (va & (size - 1) & ~(HV_PAGE_SIZE - 1));
            goto mapped;
        }
        table = entry & PTE_ADDR;
    }
    *gpa = entry & PTE_ADDR;
mapped:
    *present = 1;
    if (user && !user_ok)
        return -1;
    *perms = UC_PROT_READ;
    if (writable || (!user && !(cr0 & CR0_WP)))
        *perms |= UC_PROT_WRITE;
    if (executable)
        *perms |= UC_PROT_EXEC;
    switch (access) {
    case UC_MEM_WRITE: if (!(*perms & UC_PROT_WRITE)) return -1; break;
    case UC_MEM_FETCH: if (!(*perms & UC_PROT_EXEC)) return -1; break;
    }
    if (d->pv_model != HV_PV_XEN)
        set_accessed_dirty(d, at_level, levels, access == UC_MEM_WRITE, perms);
    return 0;
}

/* Where TCG's TLB puts va now for an access (UC_MEM_READ, _WRITE or _FETCH) of the
 * guest's current mode: 0 with the guest-physical address of its page's byte, or -1
 * (a miss, an entry the guest's access would take the slow path for, not the guest's
 * RAM, no such entry point in the library): then walk. Only Xen's PV model, whose
 * accesses are all ring 3's and whose tables change only through the model, which
 * flushes the TLB where a change must reach the guest; not a kvm vCPU's twin, whose
 * TLB kvm's flushes reach only when it next runs; and only on the thread running the
 * vCPU (bt_run), which alone may touch its Unicorn. The last page found is kept
 * for as long as the TLB is not flushed (tlb_gen): the same answer, without asking. */
/* The TLB's answer (bt_tlb_gpa), kept as the vCPU's last page (hv_tlb_page) where it
 * can be: a plain RAM page, for a read or write. */
static __attribute__((noinline)) int tlb_lookup(struct bt_vcpu *b, uint64_t va, int access,
                                                uint64_t *gpa)
{
    struct hv_domain *d = b->v->dom;
    struct hv_tlb_page *t = &b->v->tlb_page;
    uint8_t *host = bt_uc.tlb_host(b->uc, va, access == UC_MEM_WRITE ? 1 :
                                              access == UC_MEM_FETCH ? 2 : 0);
    uint64_t at;

    if (!host || host < d->ram || (uint64_t)(host - d->ram) >= d->ram_bytes + d->gnt_bytes)
        return -1;
    at = (uint64_t)(host - d->ram);
    if (b->tlb_gen && access != UC_MEM_FETCH) {
        t->thread = b->run_thread;
        t->va_page = va & ~(HV_PAGE_SIZE - 1);
        t->gpa_page = at & ~(HV_PAGE_SIZE - 1);
        t->at_gen = *b->tlb_gen;
        t->writable = access == UC_MEM_WRITE &&
                      !(t->gpa_page >= d->pt_pool_start && t->gpa_page < d->pt_pool_end);
        t->gen = b->tlb_gen;            /* only the running thread uses it */
    }
    *gpa = at;
    return 0;
}

int bt_tlb_gpa(struct bt_vcpu *b, uint64_t va, int access, uint64_t *gpa)
{
    if (b->run_thread != __builtin_thread_pointer() || b->twin || !bt_uc.tlb_host ||
        b->v->dom->pv_model != HV_PV_XEN)
        return -1;
    if (access != UC_MEM_FETCH && hv_tlb_page_hit(b->v, va, access == UC_MEM_WRITE, gpa))
        return 0;
    return tlb_lookup(b, va, access, gpa);
}

/* A PVH guest runs 32-bit code until it enters long mode, and compat-mode code when
 * its CS descriptor has L clear; Unicorn keeps the descriptor to itself, so the GDT
 * entry CS names tells (the guest does not change a loaded entry under itself). */
int bt_code32(struct bt_vcpu *b)
{
    uc_x86_mmr gdtr;
    uint16_t cs;
    uint64_t desc;

    if (b->v->dom->pv_model == HV_PV_XEN)
        return !(b->uc_code_bits & 1);      /* what bt_load_code_mode last loaded */
    if (b->v->dom->guest_type != HV_GUEST_PVH)
        return 0;
    if (!(efer(b) & (1ULL << 10)))             /* EFER.LMA */
        return 1;
    cs = (uint16_t)bt_reg(b, UC_X86_REG_CS);
    memset(&gdtr, 0, sizeof(gdtr));
    bt_uc.reg_read(b->uc, UC_X86_REG_GDTR, &gdtr);
    if ((cs & 4) || (uint64_t)(cs & ~7u) + 7 > gdtr.limit ||
        bt_read_virt(b, gdtr.base + (cs & ~7u), &desc, 8) < 0)
        return 0;
    return !((desc >> 53) & 1);                 /* L */
}

/* Read guest memory by virtual address, page by page, inside RAM only: 0 or -1. */
int bt_read_virt(struct bt_vcpu *b, uint64_t va, void *dst, int len)
{
    uint8_t *out = dst;
    while (len > 0) {
        uint64_t gpa;
        int perms, present, chunk = (int)(HV_PAGE_SIZE - (va & (HV_PAGE_SIZE - 1)));
        if (chunk > len)
            chunk = len;
        if (bt_tlb_gpa(b, va, UC_MEM_READ, &gpa) < 0) {
            if (bt_walk(b, va, UC_MEM_READ, &gpa, &perms, &present) < 0)
                return -1;
            gpa |= va & (HV_PAGE_SIZE - 1);
        }
        if (!hv_gpa_valid(b->v->dom, gpa, (uint64_t)chunk))
            return -1;
        memcpy(out, b->v->dom->ram + gpa, (size_t)chunk);
        out += chunk;
        va += (uint64_t)chunk;
        len -= chunk;
    }
    return 0;
}

/* Write guest memory by virtual address as a ring-0 store would (the page must be
 * writable and not a page-table frame): 0, or -1 with the first address refused. */
static int write_virt(struct bt_vcpu *b, uint64_t va, const void *src, int len, uint64_t *bad)
{
    struct hv_domain *d = b->v->dom;
    const uint8_t *in = src;
    uint64_t at = va;
    /* check every page first, so a fault half-way leaves memory untouched */
    for (int left = len; left > 0;) {
        uint64_t gpa;
        int perms, present, chunk = (int)(HV_PAGE_SIZE - (at & (HV_PAGE_SIZE - 1)));
        if (chunk > left)
            chunk = left;
        if (bt_walk(b, at, UC_MEM_WRITE, &gpa, &perms, &present) < 0 ||
            !hv_gpa_valid(d, gpa, HV_PAGE_SIZE) ||
            (gpa >= d->pt_pool_start && gpa < d->pt_pool_end)) {
            *bad = at;
            return -1;
        }
        at += (uint64_t)chunk;
        left -= chunk;
    }
    while (len > 0) {
        uint64_t gpa;
        int perms, present, chunk = (int)(HV_PAGE_SIZE - (va & (HV_PAGE_SIZE - 1)));
        if (chunk > len)
            chunk = len;
        bt_walk(b, va, UC_MEM_WRITE, &gpa, &perms, &present);
        memcpy(d->ram + gpa + (va & (HV_PAGE_SIZE - 1)), in, (size_t)chunk);
        in += chunk;
        va += (uint64_t)chunk;
        len -= chunk;
    }
    return 0;
}

/* ---- #PF for a refused access ---- */

static uint64_t reg_by_number(struct bt_vcpu *b, int n)
{
    static const int ids[16] = {
        UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RBX,
        UC_X86_REG_RSP, UC_X86_REG_RBP, UC_X86_REG_RSI, UC_X86_REG_RDI,
        UC_X86_REG_R8, UC_X86_REG_R9, UC_X86_REG_R10, UC_X86_REG_R11,
        UC_X86_REG_R12, UC_X86_REG_R13, UC_X86_REG_R14, UC_X86_REG_R15,
    };
    return bt_reg(b, ids[n & 15]);
}

/* The address the faulting instruction at rip meant to touch, when the decoder can
 * tell (a ModRM memory operand, the stack, a string operand); 0 if not. The TLB fill
 * only sees the page, and cr2 wants the byte. */
static int access_address(struct bt_vcpu *b, uint64_t rip, int access, uint64_t *ea)
{
    uint8_t code[15];
    struct bt_insn in;
    int avail = 15;
    uint64_t rsp = bt_reg(b, UC_X86_REG_RSP);

    while (avail > 0 && bt_read_virt(b, rip, code, avail) < 0)
        avail--;                /* the instruction may end just before an unmapped page */
    if (avail == 0 || bt_decode(code, avail, &in) < 0)
        return 0;
    if (in.map == 0) {
        uint8_t op = in.opcode, reg = (in.modrm >> 3) & 7;
        if ((op >= 0x50 && op <= 0x57) || op == 0x68 || op == 0x6a || op == 0x9c ||
            op == 0xe8 || (op == 0xff && (reg == 2 || reg == 6) && (in.modrm >> 6) == 3)) {
            *ea = rsp - 8;
            return 1;
        }
        if ((op >= 0x58 && op <= 0x5f) || op == 0x9d || op == 0xc3 || op == 0xc2 ||
            op == 0xcf || (op == 0x8f && (in.modrm >> 6) == 3)) {
            *ea = rsp;
            return 1;
        }
        if (op >= 0xa4 && op <= 0xaf) {
            *ea = bt_reg(b, access == UC_MEM_WRITE ? UC_X86_REG_RDI : UC_X86_REG_RSI);
            return 1;
        }
    }
    if (!in.has_modrm || (in.modrm >> 6) == 3)
        return 0;
    {
        uint64_t addr = (uint64_t)(int64_t)in.disp;
        int rm = in.modrm & 7, mod = in.modrm >> 6;
        if (rm == 4) {
            int base = (in.sib & 7) | ((in.rex & 1) << 3);
            int index = ((in.sib >> 3) & 7) | ((in.rex & 2) << 2);
            if (index != 4)
                addr += reg_by_number(b, index) << (in.sib >> 6);
            if (!((in.sib & 7) == 5 && mod == 0))
                addr += reg_by_number(b, base);
        } else if (rm == 5 && mod == 0) {
            addr += rip + in.len;
        } else {
            addr += reg_by_number(b, rm | ((in.rex & 1) << 3));
        }
        if (in.addr32)
            addr &= 0xffffffffULL;
        if (in.seg == 0x64)
            addr += bt_reg(b, UC_X86_REG_FS_BASE);
        else if (in.seg == 0x65)
            addr += bt_reg(b, UC_X86_REG_GS_BASE);
        *ea = addr;
        return 1;
    }
}

/* Does the instruction at rip reach memory through SS (bt_stack_access)? */
static int stack_segment_access(struct bt_vcpu *b, uint64_t rip)
{
    uint8_t code[15];
    struct bt_insn in;
    int avail = 15;

    while (avail > 0 && bt_read_virt(b, rip, code, avail) < 0)
        avail--;
    return avail > 0 && bt_decode(code, avail, &in) == 0 && bt_stack_access(&in) != 0;
}

void bt_page_fault_event(struct bt_vcpu *b, struct bt_event *ev)
{
    uint64_t page = b->fault_va & ~(HV_PAGE_SIZE - 1), rip = bt_reg(b, UC_X86_REG_RIP), ea;
    memset(ev, 0, sizeof(*ev));
    if (b->fault_noncanonical) {
        /* a non-canonical address is #GP(0), not #PF; #SS(0) through the stack segment */
        ev->vector = stack_segment_access(b, rip) ? 12 : 13;
        ev->has_error = 1;
        return;
    }
    ev->vector = 14;
    ev->has_error = 1;
    ev->error = (b->fault_present ? PF_P : 0) | (b->fault_rsvd ? PF_RSVD : 0) |
                (b->fault_access == UC_MEM_WRITE ? PF_W : 0) |
                ((bt_reg(b, UC_X86_REG_CS) & 3) == 3 ? PF_U : 0) |
                (b->fault_access == UC_MEM_FETCH && (efer(b) & EFER_NXE) ? PF_I : 0);
    ev->set_cr2 = 1;
    ev->cr2 = page;
    if (b->fault_access == UC_MEM_FETCH) {
        if ((rip & ~(HV_PAGE_SIZE - 1)) == page)
            ev->cr2 = rip;
    } else if (access_address(b, rip, b->fault_access, &ea)) {
        /* an access straddling into the page faults at the page's first byte */
        if ((ea & ~(HV_PAGE_SIZE - 1)) == page)
            ev->cr2 = ea;
    }
}

/* ---- IDT delivery ---- */

static int contributory(int vector)
{
    return vector == 0 || (vector >= 10 && vector <= 13);
}

enum { DELIVERED = 0, FAULTED = 1, CANNOT = 2 };

/* A fault (not a trap, an abort or an interrupt): the instruction did not complete,
 * and the RFLAGS image the CPU pushes has RF set, so that returning to it does not
 * hit an instruction breakpoint again. */
static int fault_class(const struct bt_event *ev)
{
    static const uint32_t faults = 1u << 0 | 1u << 5 | 1u << 6 | 1u << 7 | 1u << 10 |
                                   1u << 11 | 1u << 12 | 1u << 13 | 1u << 14 | 1u << 16 |
                                   1u << 17 | 1u << 19 | 1u << 20 | 1u << 21;
    return !ev->soft && ev->vector < 32 && ((faults >> ev->vector) & 1);
}

/* ---- from ring 3 to ring 0 ----
 *
 * Unicorn takes the CPL from SS's cached descriptor and changes it only as guest
 * instructions do: in 64-bit mode a segment register write sets the selector alone,
 * `syscall` and `sysenter` only call hooks, and no IDT entry is ever entered. What does
 * raise the CPL is a far call through a call gate, so the VMM has the CPU make one, from
 * a page of its own (struct bt_tramp) that the TLB maps at BT_TRAMP_VA only while it
 * runs, with GDTR and TR pointing into that page: its GDT holds a copy of the guest's
 * descriptor for the target code selector and a 64-bit call gate to it, its TSS a RSP0
 * inside the page, so the call's own pushes land there and no guest memory changes.
 * The gate's target is the page's next instruction, where emu_start stops; rsp is put
 * back, and the caller sets rip, rflags (and rsp for a delivery). */
#define TRAMP_GATE (BT_TRAMP_GDT_ENTRIES - 2)   /* 16 bytes: the last two entries */

int bt_enter_ring0(struct bt_vcpu *b, uint16_t cs, uint64_t desc)
{
    struct bt_tramp *t = b->tramp;
    uc_x86_mmr gdtr, tr, own_gdtr, own_tr;
    uint64_t stop_at = BT_TRAMP_VA + offsetof(struct bt_tramp, landing);
    uint64_t rsp = bt_reg(b, UC_X86_REG_RSP);
    unsigned index = cs >> 3;
    uint16_t gate_sel = (uint16_t)(TRAMP_GATE << 3 | 3);
    uc_err e;
    int ok;

    if (index == 0 || index >= TRAMP_GATE)
        return -1;
    memset(&gdtr, 0, sizeof(gdtr));
    memset(&tr, 0, sizeof(tr));
    bt_uc.reg_read(b->uc, UC_X86_REG_GDTR, &gdtr);
    bt_uc.reg_read(b->uc, UC_X86_REG_TR, &tr);
    memset(t->gdt, 0, sizeof(t->gdt));
    t->gdt[index] = desc;
    /* a 64-bit call gate (type 0xC), DPL 3, present, to cs:stop_at */
    t->gdt[TRAMP_GATE] = (stop_at & 0xffff) | (uint64_t)(cs & 0xfffc) << 16 |
                         0xecULL << 40 | ((stop_at >> 16) & 0xffff) << 48;
    t->gdt[TRAMP_GATE + 1] = stop_at >> 32;
    memcpy(t->far_ptr + 8, &gate_sel, 2);
    t->rsp0 = BT_TRAMP_VA + offsetof(struct bt_tramp, stack_top);

    own_gdtr = (uc_x86_mmr){ .base = BT_TRAMP_VA + offsetof(struct bt_tramp, gdt),
                             .limit = sizeof(t->gdt) - 1 };
    own_tr = (uc_x86_mmr){ .base = BT_TRAMP_VA + offsetof(struct bt_tramp, tss),
                           .limit = sizeof(t->tss) - 1, .flags = 0x8b00 };   /* busy, present */
    bt_uc.reg_write(b->uc, UC_X86_REG_GDTR, &own_gdtr);
    bt_uc.reg_write(b->uc, UC_X86_REG_TR, &own_tr);
    b->tramp_active = 1;
    bt_uc.ctl(b->uc, UC_CTL_TLB_FLUSH_W);
    e = bt_uc.emu_start(b->uc, BT_TRAMP_VA, stop_at, 0, 0);
    b->tramp_active = 0;
    bt_uc.ctl(b->uc, UC_CTL_TLB_FLUSH_W);      /* the page leaves the guest's view */
    bt_uc.reg_write(b->uc, UC_X86_REG_GDTR, &gdtr);
    bt_uc.reg_write(b->uc, UC_X86_REG_TR, &tr);
    bt_set_reg(b, UC_X86_REG_RSP, rsp);         /* the call switched to the page's stack */
    ok = e == UC_ERR_OK && bt_reg(b, UC_X86_REG_RIP) == stop_at &&
         (bt_reg(b, UC_X86_REG_CS) & 0xffff) == (cs & 0xfffc);
    b->exception.vector = -1;   /* nothing of the guest's happened in there */
    return ok ? 0 : -1;
}

/* The way back to ring 3 is the CPU's own iretq; TCG runs it as any instruction,
 * except when an interrupt waits for the IF it sets: then the emulator has to stop
 * right after it, and the VMM has the CPU run it from its page, on a copy of the frame
 * whose rip is the page's landing (where emu_start stops), before setting the real
 * rip. The guest's GDT gives the new CS and SS, as for the guest's own iretq. */
int bt_iret_to_user(struct bt_vcpu *b, const uint64_t frame[5])
{
    struct bt_tramp *t = b->tramp;
    uint64_t landing = BT_TRAMP_VA + offsetof(struct bt_tramp, landing);
    uint64_t rip = bt_reg(b, UC_X86_REG_RIP), rsp = bt_reg(b, UC_X86_REG_RSP);
    uc_err e;
    int ok;

    t->iret_frame[0] = landing;
    memcpy(&t->iret_frame[1], &frame[1], 4 * sizeof(uint64_t));
    bt_set_reg(b, UC_X86_REG_RSP, BT_TRAMP_VA + offsetof(struct bt_tramp, iret_frame));
    b->tramp_active = 1;
    bt_uc.ctl(b->uc, UC_CTL_TLB_FLUSH_W);
    e = bt_uc.emu_start(b->uc, BT_TRAMP_VA + offsetof(struct bt_tramp, iret), landing, 0, 0);
    b->tramp_active = 0;
    bt_uc.ctl(b->uc, UC_CTL_TLB_FLUSH_W);
    ok = e == UC_ERR_OK && bt_reg(b, UC_X86_REG_RIP) == landing &&
         (bt_reg(b, UC_X86_REG_CS) & 3) == 3;
    b->exception.vector = -1;
    if (!ok) {                  /* a fault: the CPU changed nothing; TCG will raise it */
        bt_set_reg(b, UC_X86_REG_RSP, rsp);
        bt_set_reg(b, UC_X86_REG_RIP, rip);
        return -1;
    }
    bt_set_reg(b, UC_X86_REG_RIP, frame[0]);
    return 0;
}

/* ---- compat mode: the code descriptor of a PV guest ----
 *
 * Unicorn runs a PV guest at its own ring 0 and takes 64-bit or compat mode from CS's
 * cached descriptor, which a register write leaves alone (in 64-bit mode it sets the
 * selector only). The CPU's own iret loads it: from the VMM's page, at ring 0, to a
 * copy of the guest's descriptor with DPL 0 (the ring stays 0), and SS with a flat
 * stack segment of DPL 0 whose B bit makes compat code push and pop through ESP. From
 * 64-bit code that is the page's iretq; from compat code, whose EIP cannot reach the
 * page's usual place, an iretd from its second view below 4 GiB. Both end at the
 * landing of that view. The copy is flat (base 0, 4 GiB), as Xen's FLAT_RING3_CS32 and
 * every 32-bit ABI's code segment are; only L and D come from the guest's. */
#define TRAMP_CODE_SEL  0x08
#define TRAMP_STACK_SEL 0x10

int bt_load_code_mode(struct bt_vcpu *b, uint64_t desc)
{
    struct bt_tramp *t = b->tramp;
    uint64_t landing = BT_TRAMP32_VA + offsetof(struct bt_tramp, landing), begin;
    uint64_t rip = bt_reg(b, UC_X86_REG_RIP), rsp = bt_reg(b, UC_X86_REG_RSP);
    uint64_t rflags = bt_reg(b, UC_X86_REG_RFLAGS);
    uint8_t bits = (uint8_t)((desc >> 53) & 3);
    uc_x86_mmr gdtr, own_gdtr;
    uc_err e;
    int ok;

    memset(&gdtr, 0, sizeof(gdtr));
    bt_uc.reg_read(b->uc, UC_X86_REG_GDTR, &gdtr);
    memset(t->gdt, 0, 3 * sizeof(t->gdt[0]));
    /* code, DPL 0, present, G, limit 0xfffff; L and D as the guest's */
    t->gdt[TRAMP_CODE_SEL >> 3] = 0x008f9b000000ffffULL | (uint64_t)bits << 53;
    t->gdt[TRAMP_STACK_SEL >> 3] = 0x00cf93000000ffffULL;   /* data, DPL 0, B, G */
    own_gdtr = (uc_x86_mmr){ .base = BT_TRAMP_VA + offsetof(struct bt_tramp, gdt),
                             .limit = sizeof(t->gdt) - 1 };
    if (b->uc_code_bits & 1) {
        const uint64_t frame[5] = { landing, TRAMP_CODE_SEL, 2,
                                    BT_TRAMP_VA + offsetof(struct bt_tramp, stack_top),
                                    TRAMP_STACK_SEL };
        memcpy(t->iret_frame, frame, sizeof(frame));
        bt_set_reg(b, UC_X86_REG_RSP, BT_TRAMP_VA + offsetof(struct bt_tramp, iret_frame));
        begin = BT_TRAMP_VA + offsetof(struct bt_tramp, iret);
    } else {
        const uint32_t frame[3] = { (uint32_t)landing, TRAMP_CODE_SEL, 2 };
        memcpy(t->iret32_frame, frame, sizeof(frame));
        bt_set_reg(b, UC_X86_REG_RSP, BT_TRAMP32_VA + offsetof(struct bt_tramp, iret32_frame));
        begin = BT_TRAMP32_VA + offsetof(struct bt_tramp, iret32);
    }
    bt_uc.reg_write(b->uc, UC_X86_REG_GDTR, &own_gdtr);
    b->tramp_active = 1;
    bt_uc.ctl(b->uc, UC_CTL_TLB_FLUSH_W);
    e = bt_uc.emu_start(b->uc, begin, landing, 0, 0);
    b->tramp_active = 0;
    bt_uc.ctl(b->uc, UC_CTL_TLB_FLUSH_W);
    ok = e == UC_ERR_OK && bt_reg(b, UC_X86_REG_RIP) == landing;
    bt_uc.reg_write(b->uc, UC_X86_REG_GDTR, &gdtr);
    bt_set_reg(b, UC_X86_REG_RSP, rsp);
    bt_set_reg(b, UC_X86_REG_RIP, rip);
    bt_set_reg(b, UC_X86_REG_RFLAGS, rflags);
    b->exception.vector = -1;   /* nothing of the guest's happened in there */
    if (!ok)
        return -1;
    b->uc_code_bits = bits;
    return 0;
}

void bt_guest_cpuid(struct bt_vcpu *b, uint32_t leaf, uint32_t subleaf, uint32_t out[4])
{
    static const int ids[] = { UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX,
                               UC_X86_REG_RDX, UC_X86_REG_RIP };
    uint64_t saved[5], got[4] = { 0 };
    void *saved_p[] = { &saved[0], &saved[1], &saved[2], &saved[3], &saved[4] };
    void *got_p[] = { &got[0], &got[1], &got[2], &got[3] };
    uint64_t landing = BT_TRAMP_VA + offsetof(struct bt_tramp, landing);

    bt_uc.reg_read_batch(b->uc, ids, saved_p, 5);
    bt_set_reg(b, UC_X86_REG_RAX, leaf);
    bt_set_reg(b, UC_X86_REG_RCX, subleaf);
    b->tramp_active = 1;
    bt_uc.ctl(b->uc, UC_CTL_TLB_FLUSH_W);
    /* cpuid, then a jump to the landing, where emu_start stops */
    bt_uc.emu_start(b->uc, BT_TRAMP_VA + offsetof(struct bt_tramp, cpuid), landing, 0, 0);
    b->tramp_active = 0;
    bt_uc.ctl(b->uc, UC_CTL_TLB_FLUSH_W);
    bt_uc.reg_read_batch(b->uc, ids, got_p, 4);
    for (int i = 0; i < 5; i++)
        bt_set_reg(b, ids[i], saved[i]);
    b->exception.vector = -1;
    for (int i = 0; i < 4; i++)
        out[i] = (uint32_t)got[i];
}

/* Load XCR0 into TCG: Unicorn has no register for it, so the trampoline executes
 * xsetbv in TCG's ring 0 (CR4.OSXSAVE must be on). -1 if TCG refused the value. */
int bt_set_xcr0(struct bt_vcpu *b, uint64_t xcr0)
{
    static const int ids[] = { UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RIP };
    uint64_t saved[4];
    void *saved_p[] = { &saved[0], &saved[1], &saved[2], &saved[3] };
    uint64_t landing = BT_TRAMP_VA + offsetof(struct bt_tramp, landing);
    int refused;

    bt_uc.reg_read_batch(b->uc, ids, saved_p, 4);
    bt_set_reg(b, UC_X86_REG_RAX, (uint32_t)xcr0);
    bt_set_reg(b, UC_X86_REG_RDX, xcr0 >> 32);
    bt_set_reg(b, UC_X86_REG_RCX, 0);
    b->exception.vector = -1;
    b->tramp_active = 1;
    bt_uc.ctl(b->uc, UC_CTL_TLB_FLUSH_W);
    bt_uc.emu_start(b->uc, BT_TRAMP_VA + offsetof(struct bt_tramp, xsetbv), landing, 0, 0);
    b->tramp_active = 0;
    bt_uc.ctl(b->uc, UC_CTL_TLB_FLUSH_W);
    refused = b->exception.vector >= 0;
    for (int i = 0; i < 4; i++)
        bt_set_reg(b, ids[i], saved[i]);
    b->exception.vector = -1;
    return refused ? -1 : 0;
}

/* The GDT descriptor of a selector (no LDT here): 0, or -1 if outside the table. */
int bt_gdt_entry(struct bt_vcpu *b, uint16_t sel, uint64_t *desc)
{
    uc_x86_mmr gdtr;
    memset(&gdtr, 0, sizeof(gdtr));
    bt_uc.reg_read(b->uc, UC_X86_REG_GDTR, &gdtr);
    if ((sel & 4) || (sel & ~7u) == 0 || (uint64_t)(sel & ~7u) + 7 > gdtr.limit)
        return -1;
    return bt_read_virt(b, gdtr.base + (sel & ~7u), desc, 8);
}

#define DESC_DPL(d)   ((int)(((d) >> 45) & 3))
#define DESC_P        (1ULL << 47)
#define DESC_CODE     (3ULL << 43)      /* S and the code bit */
#define DESC_L        (1ULL << 53)

/* One attempt to enter the gate of ev. FAULTED: *fault is what went wrong on the way.
 * Runs with kernel_view set: the IDT, the TSS and the new stack are ring 0's. */
static int enter_gate(struct bt_vcpu *b, const struct bt_event *ev, struct bt_event *fault,
                      struct hv_stop *stop)
{
    static const int ids[] = { UC_X86_REG_RIP, UC_X86_REG_RSP, UC_X86_REG_RFLAGS,
                               UC_X86_REG_CS, UC_X86_REG_SS };
    uint64_t rip = 0, rsp = 0, rflags = 0, cs = 0, ss = 0;
    void *vals[] = { &rip, &rsp, &rflags, &cs, &ss };
    uc_x86_mmr idtr, tr;
    uint8_t gate[16];
    uint64_t frame[6], new_rsp, target, bad, desc = 0;
    int type, ist, n = 0, cpl;
    uint16_t selector;
    /* the error code of a fault in delivery names the IDT entry (IDT bit, EXT bit) */
    uint32_t ext = ev->soft ? 0 : 1;    /* EXT: not the instruction's own event */
    uint32_t idt_error = (uint32_t)ev->vector * 8 + 2 + ext;
    int target_ring = 0;

    memset(fault, 0, sizeof(*fault));
    bt_uc.reg_read_batch(b->uc, ids, vals, 5);
    cs &= 0xffff;
    ss &= 0xffff;
    cpl = (int)(cs & 3);
    memset(&idtr, 0, sizeof(idtr));
    bt_uc.reg_read(b->uc, UC_X86_REG_IDTR, &idtr);
    memset(&tr, 0, sizeof(tr));
    bt_uc.reg_read(b->uc, UC_X86_REG_TR, &tr);
    if (cpl == 1 || cpl == 2) {
        hv_stop_with(stop, HV_STOP_FAULT, ev->vector, rip,
                     "vector %d arrived in ring %d; the bt engine delivers from rings 0 "
                     "and 3 only", ev->vector, cpl);
        return CANNOT;
    }
    if ((uint64_t)ev->vector * 16 + 15 > idtr.limit ||
        bt_read_virt(b, idtr.base + (uint64_t)ev->vector * 16, gate, 16) < 0) {
        fault->vector = 13;
        fault->has_error = 1;
        fault->error = idt_error;
        return FAULTED;
    }
    type = gate[5] & 0x0f;
    if (type != 0xe && type != 0xf) {
        fault->vector = 13;
        fault->has_error = 1;
        fault->error = idt_error;
        return FAULTED;
    }
    /* int n, int3, into: the gate must let the current ring in (not so for a fault,
     * an external interrupt, or int1) */
    if (ev->soft && ((gate[5] >> 5) & 3) < cpl) {
        fault->vector = 13;
        fault->has_error = 1;
        fault->error = (uint32_t)ev->vector * 8 + 2;
        return FAULTED;
    }
    if (!(gate[5] & 0x80)) {
        fault->vector = 11;     /* #NP */
        fault->has_error = 1;
        fault->error = idt_error;
        return FAULTED;
    }
    selector = (uint16_t)(gate[2] | gate[3] << 8);
    target = (uint64_t)gate[0] | (uint64_t)gate[1] << 8 | (uint64_t)gate[6] << 16 |
             (uint64_t)gate[7] << 24 | (uint64_t)gate[8] << 32 | (uint64_t)gate[9] << 40 |
             (uint64_t)gate[10] << 48 | (uint64_t)gate[11] << 56;
    if ((selector & ~3) == 0 || (cpl == 0 && (selector & 3) != 0)) {
        /* (from ring 0 the target must be ring 0's own: no descriptor is read) */
        fault->vector = 13;
        fault->has_error = 1;
        fault->error = (selector & ~3u) | ext;
        return FAULTED;
    }
    if (cpl == 3) {
        /* a present 64-bit code segment; the gate selector's RPL does not count */
        if (bt_gdt_entry(b, selector, &desc) < 0 || (desc & DESC_CODE) != DESC_CODE ||
            !(desc & DESC_L)) {
            fault->vector = 13;
            fault->has_error = 1;
            fault->error = (selector & ~3u) | ext;
            return FAULTED;
        }
        if (!(desc & DESC_P)) {
            fault->vector = 11;
            fault->has_error = 1;
            fault->error = (selector & ~3u) | ext;
            return FAULTED;
        }
        target_ring = DESC_DPL(desc);
    }
    ist = gate[4] & 7;
    new_rsp = rsp;
    if (ist) {
        if (tr.limit < 0x24 + (uint32_t)ist * 8 - 1 ||
            bt_read_virt(b, tr.base + 0x24 + (uint64_t)(ist - 1) * 8, &new_rsp, 8) < 0) {
            fault->vector = 10; /* #TS */
            fault->has_error = 1;
            fault->error = (uint32_t)(tr.selector & ~3u) | ext;
            return FAULTED;
        }
    } else if (target_ring < cpl) {
        /* to an inner ring: the stack TSS.RSPn names */
        uint32_t at = 4 + 8 * (uint32_t)target_ring;
        if (tr.limit < at + 7 || bt_read_virt(b, tr.base + at, &new_rsp, 8) < 0) {
            fault->vector = 10; /* #TS */
            fault->has_error = 1;
            fault->error = (uint32_t)(tr.selector & ~3u) | ext;
            return FAULTED;
        }
    }
    if (target_ring != 0) {
        hv_stop_with(stop, HV_STOP_FAULT, ev->vector, rip, "vector %d from ring 3 goes to "
                     "ring %d; the bt engine delivers to ring 0 only", ev->vector, target_ring);
        return CANNOT;
    }
    new_rsp &= ~15ULL;
    if (ev->has_error)
        frame[n++] = ev->error;
    frame[n++] = rip;
    frame[n++] = cs;
    frame[n++] = rflags | (fault_class(ev) ? RFLAGS_RF : 0);
    frame[n++] = rsp;
    frame[n++] = ss;
    new_rsp -= (uint64_t)n * 8;
    if (write_virt(b, new_rsp, frame, n * 8, &bad) < 0) {
        uint64_t gpa;
        int perms, present;
        bt_walk(b, bad, UC_MEM_WRITE, &gpa, &perms, &present);
        fault->vector = 14;
        fault->has_error = 1;
        fault->error = PF_W | (present ? PF_P : 0);
        fault->set_cr2 = 1;
        fault->cr2 = bad;
        return FAULTED;
    }
    if (ev->set_cr2)
        bt_set_reg(b, UC_X86_REG_CR2, ev->cr2);
    rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM);
    if (type == 0xe)
        rflags &= ~RFLAGS_IF;   /* an interrupt gate: no nesting until iretq */
    if (cpl == 3 && bt_enter_ring0(b, selector, desc) < 0) {
        hv_stop_with(stop, HV_STOP_FAULT, ev->vector, rip, "vector %d from ring 3: Unicorn "
                     "refused code selector %#x", ev->vector, selector);
        return CANNOT;
    }
    bt_set_reg(b, UC_X86_REG_RSP, new_rsp);
    bt_set_reg(b, UC_X86_REG_RFLAGS, rflags);
    if (cpl == 0 && selector != cs)
        bt_set_reg(b, UC_X86_REG_CS, selector);
    bt_set_reg(b, UC_X86_REG_RIP, target);
    return DELIVERED;
}

int bt_deliver(struct bt_vcpu *b, const struct bt_event *ev, struct hv_stop *stop)
{
    struct bt_event cur = *ev, fault;

    for (;;) {
        int r;
        b->kernel_view = 1;
        r = enter_gate(b, &cur, &fault, stop);
        b->kernel_view = 0;
        if (r == DELIVERED)
            return 0;
        if (r == CANNOT)
            return -1;
        if (cur.insn_len)   /* int n, icebp did not complete: the fault names them */
            bt_set_reg(b, UC_X86_REG_RIP, bt_reg(b, UC_X86_REG_RIP) - (uint64_t)cur.insn_len);
        if (cur.vector == 8) {
            b->v->dom->counters.exits[HV_EXIT_SHUTDOWN]++;
            hv_stop_with(stop, HV_STOP_FAULT, 8, bt_reg(b, UC_X86_REG_RIP), "triple fault");
            return -1;
        }
        if (!cur.soft && cur.vector < 32 &&
            ((contributory(cur.vector) && contributory(fault.vector)) ||
             (cur.vector == 14 && (contributory(fault.vector) || fault.vector == 14)))) {
            memset(&cur, 0, sizeof(cur));
            cur.vector = 8;     /* #DF, error code 0 */
            cur.has_error = 1;
        } else {
            cur = fault;
        }
    }
}
