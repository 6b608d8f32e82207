/*
 * pv_region.c - the hypervisor's region of a Xen-model PV domain: the real GDT, IDT,
 * TSS, exception stubs, syscall landing page and ring-0 stack, and the page tables
 * that map them at PV_AREA_VA in L4 slot 271 of every L4 the guest uses (with the
 * M2P again and a ring-0 map of guest RAM for the stubs' rewrite routine), and the M2P
 * in slot 256.
 *
 * The region is host memory of its own, seen by the engines at guest-physical
 * PV_REGION_GPA, above guest RAM: the memory service refuses any guest PTE naming a
 * frame there, so the guest reaches it only through the mappings written here. Those
 * are supervisor-only (a CPL3 access faults) except the landing page, which `syscall`
 * must be able to fetch from ring 3 on hosts that do not switch to ring 0 (PVM-HOST.md),
 * and which holds nothing but two instructions, and the M2P, which guests read (Xen
 * maps it user-readable). Nothing is writable from ring 3.
 */
#include <string.h>
#include <sys/mman.h>

#include "hv.h"

#define PTE_P    (1ULL << 0)
#define PTE_RW   (1ULL << 1)
#define PTE_US   (1ULL << 2)
#define PTE_A    (1ULL << 5)
#define PTE_D    (1ULL << 6)
#define PTE_PS   (1ULL << 7)
#define PTE_NX   (1ULL << 63)

#define PAGE 4096ULL

static uint64_t area_flags(int f);

/* A vCPU's own frames: vCPU 0's are the fixed ones (enum pv_frame); vCPU n's follow the
 * M2P, VCPU_FRAMES each, in this order. */
enum { VF_L1, VF_GDT, VF_TSS, VF_STACK = VF_TSS + 3, VCPU_FRAMES = VF_STACK + 2 };

static uint64_t m2p_l1s(uint64_t frames);
static uint64_t m2p_pages(uint64_t frames);

#define GIB (1ULL << 30)
#define MIB2 (2ULL << 20)

/* The L2 tables of the ring-0 map of guest RAM (PV_RAM_VA), one per GiB, after the
 * last vCPU's frames. */
static uint64_t ram_map_l2s(struct hv_domain *d)
{
    return (d->ram_bytes + GIB - 1) / GIB;
}

static uint64_t ram_map_l2(struct hv_domain *d, uint64_t i)
{
    uint64_t frames = d->ram_bytes / 4096ULL;
    return PVF_NR + m2p_l1s(frames) + m2p_pages(frames) +
           (uint64_t)(d->max_vcpus - 1) * VCPU_FRAMES + i;
}

static uint64_t vcpu_frame(struct hv_domain *d, int id, int which)
{
    static const int boot[VCPU_FRAMES] = { PVF_L1, PVF_GDT, PVF_TSS, PVF_TSS + 1,
                                           PVF_TSS + 2, PVF_STACK, PVF_STACK + 1 };
    uint64_t frames = d->ram_bytes / 4096ULL;
    if (id == 0)
        return (uint64_t)boot[which];
    return PVF_NR + m2p_l1s(frames) + m2p_pages(frames) + (uint64_t)(id - 1) * VCPU_FRAMES +
           (uint64_t)which;
}

static uint64_t frame_gpa(uint64_t f)
{
    return PV_REGION_GPA + f * PAGE;
}

static uint64_t *frame_of(struct hv_domain *d, uint64_t f)
{
    return (uint64_t *)(d->pv_region + f * PAGE);
}

/* The M2P: one u64 per frame of guest memory, in pages after the fixed frames: its L1
 * tables, then its pages. */
static uint64_t m2p_pages(uint64_t frames)
{
    return (frames * 8 + PAGE - 1) / PAGE;
}

static uint64_t m2p_l1s(uint64_t frames)
{
    return (m2p_pages(frames) + 511) / 512;
}

int pv_machphys_mapping(struct hv_domain *d, struct xen_machphys_mapping *m)
{
    uint64_t frames = d->ram_bytes / PAGE;
    if (!d->pv_region)
        return -1;
    /* Xen names its whole table's window; ours holds this domain's frames only (the
     * identity), so the window and max_mfn end where its pages end. */
    m->v_start = PV_M2P_VA;
    m->v_end = PV_M2P_VA + m2p_pages(frames) * PAGE;
    m->max_mfn = frames - 1;
    return 0;
}

int pv_xen_l4_slot(int slot)
{
    return slot >= 256 && slot < 272;       /* HYPERVISOR_VIRT_START .. _END */
}

uint64_t pv_l4_entry(int slot)
{
    /* US here, the supervisor-only pages say so in their L1 entries. */
    uint64_t flags = PTE_P | PTE_RW | PTE_US | PTE_A;
    if (slot == PV_M2P_L4_SLOT)
        return frame_gpa(PVF_M2P_L3) | flags;
    if (slot == PV_AREA_L4_SLOT)
        return frame_gpa(PVF_L3) | flags;
    return 0;
}

int pv_in_area(uint64_t va)
{
    return va >= PV_AREA_VA && va < PV_AREA_END;
}

static int pv_area_frame(uint64_t va)
{
    uint64_t page = (va - PV_AREA_VA) / PAGE;
    if (!pv_in_area(va))
        return -1;
    if (page < FIRST_RESERVED_GDT_PAGE)
        return PVF_ZERO;
    if (page == FIRST_RESERVED_GDT_PAGE)
        return PVF_GDT;
    if (va >= PV_IDT_VA && va < PV_IDT_VA + PAGE)
        return PVF_IDT;
    if (va >= PV_TSS_VA && va < PV_TSS_VA + 3 * PAGE)
        return PVF_TSS + (int)((va - PV_TSS_VA) / PAGE);
    if (va >= PV_STUBS_VA && va < PV_STUBS_VA + PAGE)
        return PVF_STUBS;
    if (va >= PV_LANDING_VA && va < PV_LANDING_VA + PAGE)
        return PVF_LANDING;
    if (va >= PV_STACK_VA && va < PV_STACK_TOP)
        return PVF_STACK + (int)((va - PV_STACK_VA) / PAGE);
    return -1;
}

int pv_region_walk(struct hv_domain *d, uint64_t va, uint64_t *gpa, int *user)
{
    uint64_t table = pv_l4_entry((int)((va >> 39) & 511)) & 0x000ffffffffff000ULL, e = 0;

    if (!d->pv_region || (va >> 48) != 0xffff || !table)
        return -1;
    *user = 1;
    for (int level = 3; level >= 1; level--) {
        /* every table of the slot is a region frame */
        if (table < PV_REGION_GPA || table - PV_REGION_GPA >= d->pv_region_bytes)
            return -1;
        e = frame_of(d, (table - PV_REGION_GPA) / PAGE)[(va >> (12 + 9 * (level - 1))) & 511];
        if (!(e & PTE_P))
            return -1;
        *user &= (e & PTE_US) != 0;
        table = e & 0x000ffffffffff000ULL;
    }
    *gpa = table;
    return 0;
}

void pv_map_gdt(struct hv_vcpu *v, const uint64_t *mfns, unsigned n)
{
    struct hv_domain *d = v->dom;
    uint64_t *l1 = frame_of(d, vcpu_frame(d, v->id, VF_L1));
    for (unsigned i = 0; i < FIRST_RESERVED_GDT_PAGE; i++) {
        uint64_t gpa = i < n ? mfns[i] << 12 : frame_gpa(PVF_ZERO);
        l1[((PV_GDT_VA >> 12) + i) & 511] = gpa | area_flags(PVF_ZERO);
    }
}

void pv_map_ldt(struct hv_vcpu *v, const uint64_t *mfns, unsigned n, uint64_t ents)
{
    struct hv_domain *d = v->dom;
    uint64_t *l1 = frame_of(d, vcpu_frame(d, v->id, VF_L1));
    uint64_t *gdt = frame_of(d, vcpu_frame(d, v->id, VF_GDT));
    uint64_t base = PV_VCPU_VA(v->id, PV_LDT_VA), limit = ents * 8 - 1;

    for (unsigned i = 0; i < PV_LDT_PAGES; i++)
        l1[((PV_LDT_VA >> 12) + i) & 511] = i < n ? mfns[i] << 12 | area_flags(PVF_ZERO) : 0;
    if (!ents) {
        gdt[(PV_LDT_SEL >> 3) & 511] = 0;
        gdt[((PV_LDT_SEL >> 3) + 1) & 511] = 0;
        return;
    }
    /* a 16-byte LDT descriptor (type 2), present, DPL 0 */
    gdt[(PV_LDT_SEL >> 3) & 511] = (limit & 0xffff) | (base & 0xffffff) << 16 |
                                   0x82ULL << 40 | ((limit >> 16) & 0xf) << 48 |
                                   ((base >> 24) & 0xff) << 56;
    gdt[((PV_LDT_SEL >> 3) + 1) & 511] = base >> 32;
}

/* L1 flags of each area page by what it holds. */
static uint64_t area_flags(int f)
{
    switch (f) {
    case PVF_STUBS:   return PTE_P | PTE_A;                     /* ring-0 code */
    case PVF_LANDING: return PTE_P | PTE_US | PTE_A;            /* ring-3 code, read-only */
    case PVF_STACK: case PVF_STACK_END:
        return PTE_P | PTE_RW | PTE_A | PTE_D | PTE_NX;
    default:
        /* GDT, IDT, TSS: read-only (descriptors are pre-set accessed, so the CPU has
         * nothing to write), no execute. */
        return PTE_P | PTE_A | PTE_NX;
    }
}

static void build_tables(struct hv_domain *d, uint64_t frames)
{
    uint64_t upper = PTE_P | PTE_RW | PTE_US | PTE_A;
    uint64_t l1s = m2p_l1s(frames), first_page = PVF_NR + l1s;
    uint64_t *m2p = frame_of(d, first_page);

    /* the M2P: read-only, readable from ring 3, the identity */
    frame_of(d, PVF_M2P_L3)[(MACH2PHYS_VIRT_START >> 30) & 511] = frame_gpa(PVF_M2P_L2) | upper;
    frame_of(d, PVF_L3)[(PV_M2P_VA >> 30) & 511] = frame_gpa(PVF_M2P_L2) | upper;
    for (uint64_t i = 0; i < l1s; i++)
        frame_of(d, PVF_M2P_L2)[i] = frame_gpa((int)(PVF_NR + i)) | upper;
    for (uint64_t p = 0; p < m2p_pages(frames); p++)
        frame_of(d, PVF_NR + p / 512)[p % 512] =
            frame_gpa((int)(first_page + p)) | PTE_P | PTE_US | PTE_A | PTE_NX;
    for (uint64_t mfn = 0; mfn < frames; mfn++)
        m2p[mfn] = mfn;

    /* RAM for the rewrite routine: supervisor-only, no execute, pre-set accessed and
     * dirty. The last 2 MiB page may reach past RAM; the routine only ever writes
     * entries of the guest's tables, which are in RAM. */
    for (uint64_t i = 0; i < ram_map_l2s(d); i++) {
        uint64_t *l2 = frame_of(d, ram_map_l2(d, i));
        frame_of(d, PVF_L3)[((PV_RAM_VA + i * GIB) >> 30) & 511] = frame_gpa(ram_map_l2(d, i)) | upper;
        for (uint64_t gpa = i * GIB; gpa < d->ram_bytes && gpa < (i + 1) * GIB; gpa += MIB2)
            l2[(gpa >> 21) & 511] = gpa | PTE_P | PTE_RW | PTE_A | PTE_D | PTE_PS | PTE_NX;
    }

    frame_of(d, PVF_L3)[(PV_AREA_VA >> 30) & 511] = frame_gpa(PVF_L2) | upper;
    for (uint32_t id = 0; id < d->max_vcpus; id++) {
        uint64_t l1 = vcpu_frame(d, (int)id, VF_L1);
        frame_of(d, PVF_L2)[((PV_VCPU_VA(id, PV_AREA_VA)) >> 21) & 511] = frame_gpa(l1) | upper;
        for (uint64_t va = PV_AREA_VA; va < PV_AREA_END; va += PAGE) {
            int f = pv_area_frame(va);
            uint64_t own = f;
            if (f < 0)
                continue;
            /* the vCPU's own GDT page, TSS and stack; the rest is shared */
            if (f == PVF_GDT)
                own = vcpu_frame(d, (int)id, VF_GDT);
            else if (f >= PVF_TSS && f <= PVF_TSS_END)
                own = vcpu_frame(d, (int)id, VF_TSS + (f - PVF_TSS));
            else if (f >= PVF_STACK && f <= PVF_STACK_END)
                own = vcpu_frame(d, (int)id, VF_STACK + (f - PVF_STACK));
            frame_of(d, l1)[(va >> 12) & 511] = frame_gpa(own) | area_flags(f);
        }
    }
}

/* A flat segment descriptor: access byte and flags nibble; base 0, limit 4 GiB. */
static uint64_t segment(uint8_t access, uint8_t flags)
{
    return 0xffffULL | (uint64_t)access << 40 | 0xfULL << 48 | (uint64_t)flags << 52;
}

static void build_gdt(struct hv_domain *d, int id)
{
    uint64_t *gdt = frame_of(d, vcpu_frame(d, id, VF_GDT));   /* entry 7168 + i is gdt[i] */
    uint64_t base = PV_VCPU_VA(id, PV_TSS_VA), limit = PV_TSS_LIMIT;

    gdt[(PV_HYPER_CS >> 3) & 511] = segment(0x9b, 0xa);        /* 64-bit code, DPL 0 */
    gdt[(PV_HYPER_DS >> 3) & 511] = segment(0x93, 0xc);        /* data, DPL 0 */
    gdt[(FLAT_RING3_CS32 >> 3) & 511] = segment(0xfb, 0xc);    /* 32-bit code, DPL 3 */
    gdt[(FLAT_RING3_SS64 >> 3) & 511] = segment(0xf3, 0xc);    /* data, DPL 3 */
    gdt[(FLAT_RING3_CS64 >> 3) & 511] = segment(0xfb, 0xa);    /* 64-bit code, DPL 3 */
    /* the 16-byte TSS descriptor: busy 64-bit TSS, as KVM_SET_SREGS loads it */
    gdt[(PV_TSS_SEL >> 3) & 511] = (limit & 0xffff) | (base & 0xffffff) << 16 |
                                   0x8bULL << 40 | ((limit >> 16) & 0xf) << 48 |
                                   ((base >> 24) & 0xff) << 56;
    gdt[((PV_TSS_SEL >> 3) + 1) & 511] = base >> 32;
}

static int has_error_code(int vector)
{
    return vector == 8 || (vector >= 10 && vector <= 14) || vector == 17 || vector == 21 ||
           vector == 29 || vector == 30;
}

/* Exception vectors go to ring-0 stubs; `int3`/`into` may come from ring 3 (DPL 3).
 * Vectors 32-255 stay not present: events are bounced by the VMM, not injected. */
static void build_idt_and_stubs(struct hv_domain *d)
{
    uint64_t *idt = frame_of(d, PVF_IDT);
    uint8_t *stubs = (uint8_t *)frame_of(d, PVF_STUBS);

    memset(stubs, 0xcc, PAGE);
    for (int vec = 0; vec < 32; vec++) {
        uint64_t target = PV_STUBS_VA + (uint64_t)vec * PV_STUB_SIZE;
        uint8_t *s = stubs + vec * PV_STUB_SIZE;
        int dpl = (vec == 3 || vec == 4) ? 3 : 0;
        int n = 0;

        /* rax goes through the stack, where the VMM can change it (a hypercall's result)
         * without a register write, which would cost an extra trip into KVM */
        s[n++] = 0x50;                  /* push %rax */
        s[n++] = 0xe6;                  /* out %al, $PV_TRAP_PORT: the VMM takes it from here */
        s[n++] = PV_TRAP_PORT;
        s[n++] = 0x58;                  /* pop %rax */
        if (has_error_code(vec)) {
            memcpy(s + n, "\x48\x83\xc4\x08", 4);   /* add $8, %rsp: drop the error code */
            n += 4;
        }
        s[n++] = 0x48;                  /* iretq, to the frame the VMM may have rewritten */
        s[n++] = 0xcf;
        idt[vec * 2] = (target & 0xffff) | (uint64_t)PV_HYPER_CS << 16 |
                       (uint64_t)(0x8e | dpl << 5) << 40 | ((target >> 16) & 0xffff) << 48;
        idt[vec * 2 + 1] = target >> 32;
    }
    /* The rewrite routine. rax is free (the stub saved it); the list sits in the lower
     * half of the page rsp is in, the top page of this vCPU's stack:
     * [0] where to go back to, [1] how many, [2..] the entries' PV_RAM_VA addresses. */
    static const uint8_t rewrite[] = {
        0x51,                               /* push %rcx */
        0x52,                               /* push %rdx */
        0x48, 0x89, 0xe0,                   /* mov %rsp, %rax */
        0x48, 0x25, 0x00, 0xf0, 0xff, 0xff, /* and $-4096, %rax */
        0x48, 0x8b, 0x48, 0x08,             /* mov 8(%rax), %rcx */
        0x48, 0x8b, 0x54, 0xc8, 0x08,       /* 1: mov 8(%rax,%rcx,8), %rdx */
        0xf0, 0x48, 0x83, 0x0a, 0x00,       /* lock orq $0, (%rdx) */
        0x48, 0xff, 0xc9,                   /* dec %rcx */
        0x75, 0xf1,                         /* jnz 1b */
        0x5a,                               /* pop %rdx */
        0x59,                               /* pop %rcx */
        0xff, 0x20,                         /* jmp *(%rax) */
    };
    memcpy(stubs + (PV_REWRITE_VA - PV_STUBS_VA), rewrite, sizeof(rewrite));
}

/* the list and the stubs' frames share the page: the list keeps to its lower half */
_Static_assert((2 + HV_MM_CHANGED_MAX) * 8 <= PAGE / 2, "the rewrite list outgrows its half page");

uint64_t pv_rewrite_entries(struct hv_vcpu *v, const uint64_t *gpas, unsigned n, uint64_t back)
{
    uint64_t *list = (uint64_t *)(pv_vcpu_stack(v) + PAGE);     /* the top page */
    list[0] = back;
    list[1] = n;
    for (unsigned i = 0; i < n; i++)
        list[2 + i] = PV_RAM_VA + gpas[i];
    return PV_REWRITE_VA;
}

static void build_tss(struct hv_domain *d, int id)
{
    uint8_t *tss = (uint8_t *)frame_of(d, vcpu_frame(d, id, VF_TSS));
    uint64_t rsp0 = PV_VCPU_VA(id, PV_STACK_TOP);
    uint16_t iomap = 0x68;

    memcpy(tss + 4, &rsp0, 8);
    memcpy(tss + 0x66, &iomap, 2);
    /* every port denied (a ring-3 in/out is #GP, emulated or bounced) but the one the
     * landing page uses; the byte after the bitmap must be all ones */
    memset(tss + 0x68, 0xff, 8192 + 1);
    tss[0x68 + PV_SYSCALL_PORT / 8] &= (uint8_t)~(1u << (PV_SYSCALL_PORT % 8));
}

static void build_landing(struct hv_domain *d)
{
    uint8_t *page = (uint8_t *)frame_of(d, PVF_LANDING);
    memset(page, 0xcc, PAGE);
    /* LSTAR's, then CSTAR's (compat mode): which one exited tells them apart */
    for (uint64_t at = 0; at <= PV_LANDING32_VA - PV_LANDING_VA; at += PV_LANDING32_VA - PV_LANDING_VA) {
        page[at] = 0xe6;                /* out %al, $PV_SYSCALL_PORT */
        page[at + 1] = PV_SYSCALL_PORT;
        page[at + 2] = 0x0f;            /* ud2: never reached, the VMM sets rip */
        page[at + 3] = 0x0b;
    }
}

int pv_domain_init(struct hv_domain *d, int model, char *err, int err_len)
{
    uint64_t frames;

    d->pv_model = model;
    if (model == HV_PV_RING0)
        return 0;
    if (model != HV_PV_XEN) {
        hv_set_error(err, err_len, "unknown PV CPU model %d", model);
        return -1;
    }
    if (d->ram_bytes + d->gnt_bytes > PV_REGION_GPA) {     /* the grant region follows RAM */
        hv_set_error(err, err_len, "guest memory reaches the hypervisor region at %#llx",
                     PV_REGION_GPA);
        return -1;
    }
    frames = d->ram_bytes / PAGE;
    d->pv_region_bytes = (ram_map_l2(d, 0) + ram_map_l2s(d)) * PAGE;
    d->pv_region = mmap(NULL, d->pv_region_bytes, PROT_READ | PROT_WRITE,
                        MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (d->pv_region == MAP_FAILED) {
        d->pv_region = NULL;
        hv_set_error(err, err_len, "out of host memory for the hypervisor region");
        return -1;
    }
    /* Every page present in host memory before the guest runs, and kept there: the
     * CPU pushes exception frames on the stack page, and a host fault in the middle
     * of that delivery is more than some nested hosts handle (a triple fault). */
    memset(d->pv_region, 0, d->pv_region_bytes);
    mlock(d->pv_region, d->pv_region_bytes);
    build_tables(d, frames);
    for (uint32_t id = 0; id < d->max_vcpus; id++) {
        build_gdt(d, (int)id);
        build_tss(d, (int)id);
    }
    build_idt_and_stubs(d);
    build_landing(d);
    return 0;
}

void pv_domain_destroy(struct hv_domain *d)
{
    if (d->pv_region)
        munmap(d->pv_region, d->pv_region_bytes);
    d->pv_region = NULL;
}

uint8_t *pv_vcpu_stack(struct hv_vcpu *v)
{
    return (uint8_t *)frame_of(v->dom, vcpu_frame(v->dom, v->id, VF_STACK));
}

void pv_vcpu_boot(struct hv_vcpu *v, uint64_t rsp)
{
    memset(&v->pv, 0, sizeof(v->pv));
    v->pv.kernel_ss = FLAT_KERNEL_SS;
    v->pv.kernel_sp = rsp;
    v->pv.dr[6] = 0xffff0ff0;           /* Xen's start-of-day DR6 and DR7 */
    v->pv.dr[7] = 0x400;
    v->pv.xcr0 = PV_XCR0_X87;           /* the reset value */
    __atomic_store_n(&hv_vcpu_info(v)->evtchn_upcall_mask, 1, __ATOMIC_RELEASE);
}
