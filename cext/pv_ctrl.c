/*
 * pv_ctrl.c - the vCPU control state a Xen-model PV kernel sets itself, by hypercall or
 * by an instruction trapless emulates (pv_emul.c): the debug registers (set_debugreg,
 * get_debugreg), CR0.TS (fpu_taskswitch), the CR4 bits a PV guest controls, the virtual
 * IOPL and I/O bitmap (physdev_op), vm_assist, and the FS and GS bases
 * (set_segment_base). XEN-ABI-FACTS §18 and §22; where the public header and Xen's code
 * differ, this follows the code (xen/arch/x86/pv/misc-hypercalls.c, emul-priv-op.c).
 *
 * What the CPU itself must see (CR0.TS, CR4.FSGSBASE, the debug registers) is marked
 * hw_dirty; the engine loads it before the guest runs again.
 */
#include <string.h>

#include "hv.h"

#define DR6_DEFAULT     0xffff0ff0ULL   /* the bits that always read as 1 */
#define DR6_VALID       0x0000e00fULL   /* B0-B3, BD, BS, BT */
#define DR7_DEFAULT     0x400ULL        /* bit 10 reads as 1 */
#define DR7_MBZ         0xd800ULL       /* bits 11, 12, 14, 15 read as 0 */
#define DR7_GD          (1ULL << 13)
#define DR7_ACTIVE      0xffULL         /* L0-L3, G0-G3 */
#define DR7_RW_IO       2               /* R/W field value of an I/O breakpoint */

static int pv_only(struct hv_vcpu *v)
{
    return v->dom->pv_model == HV_PV_XEN;
}

/* ---- debug registers ---- */

/* A breakpoint address must be a guest address: below the non-canonical hole or above
 * Xen's reserved range (Xen's access_ok for a 64-bit PV guest). */
static int guest_address(uint64_t va)
{
    return va < (1ULL << 47) || va >= HYPERVISOR_VIRT_END;
}

int pv_set_debugreg(struct hv_vcpu *v, int reg, uint64_t value)
{
    struct pv_vcpu *p = &v->pv;
    int de = (p->cr4 & PV_CR4_DE) != 0;

    if ((reg == 4 || reg == 5) && !de)
        reg += 2;                       /* without CR4.DE, DR4/5 alias DR6/7 */
    switch (reg) {
    case 0: case 1: case 2: case 3:
        if (!guest_address(value))
            return -XEN_EPERM;
        p->dr[reg] = value;
        break;
    case 6:
        if (value >> 32)
            return -XEN_EINVAL;
        p->dr[6] = (value & DR6_VALID) | DR6_DEFAULT;
        break;
    case 7: {
        uint64_t io = 0;
        if (value >> 32)
            return -XEN_EINVAL;
        if (value & DR7_GD)
            return -XEN_EPERM;
        /* I/O breakpoints (R/W = 2) need CR4.DE; the CPU cannot take them from a PV
         * guest, so Xen keeps their enable bits aside and returns them on reads. */
        if (value & DR7_ACTIVE) {
            for (int i = 0; i < 4; i++) {
                if (((value >> (16 + 4 * i)) & 3) != DR7_RW_IO)
                    continue;
                if (!de)
                    return -XEN_EPERM;
                io |= value & (3ULL << (2 * i));
            }
        }
        p->dr7_io = io;
        p->dr[7] = ((value & ~io) | DR7_DEFAULT) & ~DR7_MBZ;
        break;
    }
    default:
        return -XEN_ENODEV;             /* DR4/5 with CR4.DE, and beyond DR7 */
    }
    p->hw_dirty = 1;
    return 0;
}

int pv_get_debugreg(struct hv_vcpu *v, int reg, uint64_t *value)
{
    struct pv_vcpu *p = &v->pv;

    if ((reg == 4 || reg == 5) && !(p->cr4 & PV_CR4_DE))
        reg += 2;
    switch (reg) {
    case 0: case 1: case 2: case 3: case 6:
        *value = p->dr[reg];
        return 0;
    case 7:
        *value = p->dr[7] | p->dr7_io;
        return 0;
    }
    return -1;
}

int64_t do_set_debugreg(struct hv_vcpu *v, const struct hv_hcall *h)
{
    if (!pv_only(v))
        return -XEN_ENOSYS;
    if (h->a1 > 7)
        return -XEN_ENODEV;
    return pv_set_debugreg(v, (int)h->a1, h->a2);
}

int64_t do_get_debugreg(struct hv_vcpu *v, const struct hv_hcall *h)
{
    uint64_t value;

    if (!pv_only(v))
        return -XEN_ENOSYS;
    /* Xen's code answers -ENODEV for a register it does not have (its header says
     * -EINVAL). A value that looks like an errno is returned as it is, as in Xen. */
    if (h->a1 > 7 || pv_get_debugreg(v, (int)h->a1, &value) < 0)
        return -XEN_ENODEV;
    return (int64_t)value;
}

/* ---- control registers ---- */

/* The CR4 bits this domain's CPUID policy lets it set (Xen's pv_fixup_guest_cr4). */
static uint64_t cr4_allowed(struct hv_vcpu *v)
{
    uint32_t l1[4], l7[4];
    uint64_t ok = 0;

    pv_cpuid(v, 1, 0, l1);
    pv_cpuid(v, 7, 0, l7);
    if (l1[3] & (1u << 4))
        ok |= PV_CR4_TSD;
    if (l1[3] & (1u << 2))
        ok |= PV_CR4_DE;
    if (l7[1] & (1u << 0))
        ok |= PV_CR4_FSGSBASE;
    if (l1[2] & (1u << 26))
        ok |= PV_CR4_OSXSAVE;
    return ok;
}

uint64_t pv_read_cr(struct hv_vcpu *v, int cr)
{
    switch (cr) {
    case 0:
        return PV_CR0 | (v->pv.cr0_ts ? PV_CR0_TS : 0);
    case 2:
        return __atomic_load_n(&hv_vcpu_info(v)->arch.cr2, __ATOMIC_ACQUIRE);
    case 3:
        return v->base_mfn << HV_PAGE_SHIFT;   /* the kernel L4 */
    case 4:
        return PV_CR4_VISIBLE | v->pv.cr4;
    }
    return 0;
}

static void set_ts(struct hv_vcpu *v, int ts)
{
    if (v->pv.cr0_ts != ts) {
        v->pv.cr0_ts = ts;
        v->pv.hw_dirty = 1;
    }
}

int pv_write_cr(struct hv_vcpu *v, int cr, uint64_t value)
{
    switch (cr) {
    case 0:
        /* only TS may change; any other difference is a #GP */
        if ((value ^ pv_read_cr(v, 0)) & ~PV_CR0_TS)
            return -1;
        set_ts(v, (value & PV_CR0_TS) != 0);
        return 0;
    case 2:
        __atomic_store_n(&hv_vcpu_info(v)->arch.cr2, value, __ATOMIC_RELEASE);
        return 0;
    case 3:
        /* a new kernel L4, as MMUEXT_NEW_BASEPTR; refused: the #GP */
        return hv_mm_new_baseptr(v, (value & 0x000ffffffffff000ULL) >> HV_PAGE_SHIFT) ? -1 : 0;
    case 4: {
        /* never a fault: bits outside the guest's set, or without the feature, are
         * dropped, as Xen does */
        uint64_t cr4 = value & PV_CR4_GUEST & cr4_allowed(v);
        if (cr4 != v->pv.cr4) {
            v->pv.cr4 = cr4;
            v->pv.hw_dirty = 1;
        }
        return 0;
    }
    }
    return -1;
}

/* xsetbv from the guest kernel (Xen's x86emul write_xcr -> handle_xsetbv): XCR0 only;
 * x87 always on; only components the CPUID policy's leaf 0xd offers; AVX needs SSE and
 * AVX-512's three go together, on top of AVX. -1: the #GP. */
int pv_write_xcr(struct hv_vcpu *v, uint32_t index, uint64_t value)
{
    uint32_t xsave[4];

    pv_cpuid(v, 0xd, 0, xsave);
    if (index != 0 || !(value & PV_XCR0_X87) ||
        (value & ~((uint64_t)xsave[3] << 32 | xsave[0])) ||
        ((value & PV_XCR0_YMM) && !(value & PV_XCR0_SSE)) ||
        ((value & PV_XCR0_AVX512) && (value & PV_XCR0_AVX512) != PV_XCR0_AVX512) ||
        ((value & PV_XCR0_AVX512) && !(value & PV_XCR0_YMM)))
        return -1;
    if (value != v->pv.xcr0) {
        v->pv.xcr0 = value;
        v->pv.hw_dirty = 1;
    }
    return 0;
}

int64_t do_fpu_taskswitch(struct hv_vcpu *v, const struct hv_hcall *h)
{
    if (!pv_only(v))
        return -XEN_ENOSYS;
    set_ts(v, h->a1 != 0);
    return 0;
}

/* ---- port I/O: the virtual IOPL and the guest's I/O bitmap ---- */

int pv_iopl_ok(struct hv_vcpu *v)
{
    /* the guest kernel counts as ring 1, ring 0 with VMASST architectural_iopl */
    unsigned cpl = v->pv.user_mode ? 3 :
                   (v->pv.vm_assist & (1ULL << VMASST_TYPE_architectural_iopl)) ? 0 : 1;
    return cpl <= v->pv.iopl;
}

int pv_ports_ok(struct hv_vcpu *v, unsigned port, unsigned bytes)
{
    struct pv_vcpu *p = &v->pv;
    uint8_t bits[2] = { 0xff, 0xff };
    unsigned mask;

    if (pv_iopl_ok(v))
        return 1;
    if (port + bytes > p->iobmp_ports)
        return 0;
    /* read at the time of the access; what cannot be read counts as denied */
    if (hv_copy_from_guest(v, bits, p->iobmp + port / 8, 2) < 0 &&
        hv_copy_from_guest(v, bits, p->iobmp + port / 8, 1) < 0)
        return 0;
    mask = ((1u << bytes) - 1) << (port & 7);
    return ((bits[0] | (unsigned)bits[1] << 8) & mask) == 0;
}

int64_t do_physdev_op(struct hv_vcpu *v, const struct hv_hcall *h)
{
    struct physdev_set_iopl iopl;
    struct physdev_set_iobitmap bmp;

    if (!pv_only(v))
        return -XEN_ENOSYS;
    switch ((int32_t)h->a1) {
    case PHYSDEVOP_set_iopl:
        if (hv_copy_from_guest(v, &iopl, h->a2, sizeof(iopl)) < 0)
            return -XEN_EFAULT;
        if (iopl.iopl > 3)
            return -XEN_EINVAL;
        v->pv.iopl = iopl.iopl;
        return 0;
    case PHYSDEVOP_set_iobitmap:
        if (hv_copy_from_guest(v, &bmp, h->a2, sizeof(bmp)) < 0)
            return -XEN_EFAULT;
        if (bmp.nr_ports > 65536)
            return -XEN_EINVAL;
        v->pv.iobmp = bmp.bitmap;
        v->pv.iobmp_ports = bmp.nr_ports;
        return 0;
    }
    return -XEN_ENOSYS;
}

/* ---- vm_assist ---- */

#define VMASST_PV_VALID ((1ULL << VMASST_TYPE_4gb_segments) | \
                         (1ULL << VMASST_TYPE_4gb_segments_notify) | \
                         (1ULL << VMASST_TYPE_writable_pagetables) | \
                         (1ULL << VMASST_TYPE_pae_extended_cr3) | \
                         (1ULL << VMASST_TYPE_architectural_iopl) | \
                         (1ULL << VMASST_TYPE_runstate_update_flag) | \
                         (1ULL << VMASST_TYPE_m2p_strict))

int64_t do_vm_assist(struct hv_vcpu *v, const struct hv_hcall *h)
{
    uint64_t type = h->a2, *on = &v->pv.vm_assist;

    if (!pv_only(v))
        return -XEN_ENOSYS;
    if (h->a1 != VMASST_CMD_enable && h->a1 != VMASST_CMD_disable)
        return -XEN_ENOSYS;
    if (type >= 64 || !(VMASST_PV_VALID & (1ULL << type)))
        return -XEN_EINVAL;
    /* Xen keeps the bits per domain; trapless's PV domains have one vCPU */
    if (h->a1 == VMASST_CMD_enable)
        *on |= 1ULL << type;
    else
        *on &= ~(1ULL << type);
    return 0;
}

/* ---- set_segment_base ---- */

static int canonical(uint64_t va)
{
    uint64_t top = va >> 47;
    return top == 0 || top == 0x1ffff;
}

/* The base a data-segment load of sel would give %gs (Xen loads it and reads the
 * base back): 0 with a usable selector, or -1 where the load would fault. */
int pv_gdt_descriptor(struct hv_vcpu *v, unsigned sel, uint64_t *desc)
{
    uint64_t gpa;
    int ring3;

    if ((sel & 4) || pv_region_walk(v->dom, PV_VCPU_VA(v->id, PV_GDT_VA) + (sel & ~7u), &gpa, &ring3) < 0)
        return -1;                      /* the LDT (always empty here); beyond the GDT */
    gpa += (sel & ~7u) & 0xfff;         /* the walk gives the page */
    if (gpa >= PV_REGION_GPA) {
        if (gpa - PV_REGION_GPA + 8 > v->dom->pv_region_bytes)
            return -1;
        memcpy(desc, v->dom->pv_region + (gpa - PV_REGION_GPA), 8);
        return 0;
    }
    if (!hv_gpa_valid(v->dom, gpa, 8))
        return -1;
    memcpy(desc, v->dom->ram + gpa, 8);
    return 0;
}

int pv_segment_descriptor(struct hv_vcpu *v, unsigned sel, uint64_t *desc)
{
    if (!(sel & 4))
        return pv_gdt_descriptor(v, sel, desc);
    if ((uint64_t)(sel >> 3) >= v->pv.ldt_ents ||
        hv_copy_from_guest(v, desc, v->pv.ldt_base + (sel & ~7u), 8) < 0)
        return -1;
    return 0;
}

int pv_compat_code(struct hv_vcpu *v, uint64_t cs)
{
    uint64_t desc;

    /* Xen's flat 64-bit selector (the hypercalls' and a user's usual one) is one of
     * Xen's reserved GDT entries, which no guest changes: 64-bit code, no lookup */
    if (((unsigned)cs & 0xfffc) == (FLAT_RING3_CS64 & 0xfffc))
        return 0;
    /* a code segment (S=1, code=1) with L clear */
    return pv_segment_descriptor(v, (unsigned)cs & 0xffff, &desc) == 0 &&
           ((desc >> 43) & 3) == 3 && !((desc >> 53) & 1);
}

static int gs_selector_base(struct hv_vcpu *v, unsigned sel, uint64_t *base)
{
    uint64_t desc;
    unsigned type;

    if (pv_gdt_descriptor(v, sel, &desc) < 0)
        return -1;
    type = (unsigned)(desc >> 40) & 0x1f;          /* S and the type */
    /* present, a data segment or a readable code segment, DPL 3 */
    if (!(desc & (1ULL << 47)) || !(type & 0x10) || ((type & 0x8) && !(type & 0x2)) ||
        ((desc >> 45) & 3) != 3)
        return -1;
    *base = ((desc >> 16) & 0xffffff) | ((desc >> 32) & 0xff000000);
    return 0;
}

int64_t do_set_segment_base(struct hv_vcpu *v, const struct hv_hcall *h)
{
    struct pv_regs *r = v->pv.regs;
    uint64_t base = h->a2;

    if (!pv_only(v) || !r)
        return -XEN_ENOSYS;
    switch (h->a1) {
    case SEGBASE_FS:
        if (!canonical(base))
            return -XEN_EINVAL;
        r->fs_base = base;
        return 0;
    case SEGBASE_GS_USER:               /* hypercalls come from kernel mode: the other */
        if (!canonical(base))
            return -XEN_EINVAL;
        v->pv.gs_base_other = base;
        return 0;
    case SEGBASE_GS_KERNEL:
        if (!canonical(base))
            return -XEN_EINVAL;
        r->gs_base = base;
        return 0;
    case SEGBASE_GS_USER_SEL: {
        /* Load the user %gs: the selector with RPL 3, the user GS base from its
         * descriptor; the kernel's active base stays. A selector that would fault
         * loads null instead, without an error. */
        unsigned sel = (uint16_t)base;
        uint64_t user_base = 0;
        if (sel > 3)
            sel |= 3;
        if (sel > 3 && gs_selector_base(v, sel, &user_base) < 0)
            sel = 0;
        if (sel <= 3)
            user_base = 0;
        r->gs_sel = sel;
        v->pv.gs_base_other = user_base;
        return 0;
    }
    }
    return -XEN_EINVAL;
}
