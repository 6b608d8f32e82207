/*
 * kvm.c - the kvm engine: hardware-assisted virtualization through /dev/kvm.
 *
 * One KVM VM per domain, no in-kernel irqchip; the scheduler's workers (vcpu.c) run
 * KVM_RUN for a vCPU until it stops or parks.
 * Registers come out through KVM_CAP_SYNC_REGS and the result goes back as the data of
 * the stub's `in`, so a hypercall costs one exit and no extra ioctl or register set.
 * Page-table frames sit in a read-only memslot: the guest reads them, only the
 * hypervisor writes them.
 *
 * A domain of Xen's PV CPU model (pv_cpu.h) runs its kernel in ring 3 under the
 * hypervisor's GDT, IDT and TSS (a fourth memslot). It reaches us two ways, both an
 * `out` (PVM-HOST.md): an exception enters a ring-0 stub that exits on PV_TRAP_PORT
 * and then irets through the frame we may have rewritten; `syscall` lands on a
 * user-readable page that exits on PV_SYSCALL_PORT, and we set the registers it
 * returns with. The model itself (pv_traps.c) decides what each means.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#include <x86intrin.h>

#include "hv.h"

#define KICK_SIGNAL SIGUSR1
#define TSS_ADDR    0xfffbd000ULL   /* three pages KVM wants on Intel; outside guest RAM */

static int kvm_fd = -1;
static int kvm_open_errno;
static int kvm_run_size;
static pthread_once_t kvm_once = PTHREAD_ONCE_INIT;

static void kick_handler(int sig)
{
    (void)sig;                      /* only here to make KVM_RUN return -EINTR */
}

static void kvm_open_once(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = kick_handler;   /* no SA_RESTART: the ioctl must return */
    sigemptyset(&sa.sa_mask);
    sigaction(KICK_SIGNAL, &sa, NULL);

    kvm_fd = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm_fd < 0) {
        kvm_open_errno = errno;
        return;
    }
    kvm_run_size = ioctl(kvm_fd, KVM_GET_VCPU_MMAP_SIZE, 0);
}

static int kvm_available(char *why, int why_len)
{
    static const struct { int cap; const char *name; } needed[] = {
        { KVM_CAP_SYNC_REGS, "KVM_CAP_SYNC_REGS" },
        { KVM_CAP_READONLY_MEM, "KVM_CAP_READONLY_MEM" },
        { KVM_CAP_IMMEDIATE_EXIT, "KVM_CAP_IMMEDIATE_EXIT" },
    };
    pthread_once(&kvm_once, kvm_open_once);
    if (kvm_fd < 0) {
        if (kvm_open_errno == ENOENT)
            hv_set_error(why, why_len, "/dev/kvm does not exist (no KVM on this host)");
        else
            hv_set_error(why, why_len, "cannot open /dev/kvm: %s", strerror(kvm_open_errno));
        return 0;
    }
    if (ioctl(kvm_fd, KVM_GET_API_VERSION, 0) != KVM_API_VERSION) {
        hv_set_error(why, why_len, "/dev/kvm speaks an unknown KVM API version");
        return 0;
    }
    for (size_t i = 0; i < sizeof(needed) / sizeof(needed[0]); i++) {
        if (ioctl(kvm_fd, KVM_CHECK_EXTENSION, needed[i].cap) <= 0) {
            hv_set_error(why, why_len, "/dev/kvm lacks %s", needed[i].name);
            return 0;
        }
    }
    if (kvm_run_size < (int)sizeof(struct kvm_run)) {
        hv_set_error(why, why_len, "/dev/kvm reports a bad vCPU mmap size");
        return 0;
    }
    return 1;
}

static int pvh_setup_vm(struct hv_domain *d, char *err, int err_len);

static int map_slot(struct hv_domain *d, uint32_t slot, uint64_t start, uint64_t end,
                    uint32_t flags, void *host, char *err, int err_len)
{
    struct kvm_userspace_memory_region r = {
        .slot = slot,
        .flags = flags,
        .guest_phys_addr = start,
        .memory_size = end - start,
        .userspace_addr = (uint64_t)(uintptr_t)host,
    };
    if (start == end)
        return 0;
    if (ioctl(d->kvm_vm_fd, KVM_SET_USER_MEMORY_REGION, &r) < 0) {
        hv_set_error(err, err_len, "KVM_SET_USER_MEMORY_REGION [%#llx, %#llx): %s",
                     (unsigned long long)start, (unsigned long long)end, strerror(errno));
        return -1;
    }
    return 0;
}

static int set_slot(struct hv_domain *d, uint32_t slot, uint64_t start, uint64_t end,
                    uint32_t flags, char *err, int err_len)
{
    return map_slot(d, slot, start, end, flags, d->ram + start, err, err_len);
}

/* The pages of guest RAM KVM must not reach (PVH guests' TSS pages, below). */
static int ram_hole(struct hv_domain *d, uint64_t page)
{
    for (int i = 0; i < HV_MAX_VCPUS; i++)
        if (d->vcpus[i] && (d->vcpus[i]->tss_trap[0] == page || d->vcpus[i]->tss_trap[1] == page))
            return 1;
    return 0;
}

/* RAM below the page-table pool, the pool (read-only to the guest), RAM above and the
 * grant region after it; each cut around the holes. Slot 3 is the PV region's; a range
 * cut in pieces uses ids from 4 up for the pieces after its first. Called again when
 * the holes change: the old slots go first (KVM refuses overlapping ones). */
static int layout_ram_slots(struct hv_domain *d, char *err, int err_len)
{
    const struct { uint64_t start, end; uint32_t flags; } ranges[3] = {
        { 0, d->pt_pool_start, 0 },
        { d->pt_pool_start, d->pt_pool_end, KVM_MEM_READONLY },
        { d->pt_pool_end, d->ram_bytes + d->gnt_bytes, 0 },
    };
    uint32_t used = 0, next_extra = 4;

    for (uint32_t id = 0; id < 32; id++) {
        if (!(d->kvm_ram_slots & (1u << id)))
            continue;
        struct kvm_userspace_memory_region r = { .slot = id };
        if (ioctl(d->kvm_vm_fd, KVM_SET_USER_MEMORY_REGION, &r) < 0) {
            hv_set_error(err, err_len, "KVM_SET_USER_MEMORY_REGION (delete slot %u): %s", id,
                         strerror(errno));
            return -1;
        }
    }
    d->kvm_ram_slots = 0;
    for (uint32_t i = 0; i < 3; i++) {
        uint64_t at = ranges[i].start;
        int first = 1;
        while (at < ranges[i].end) {
            if (ram_hole(d, at)) {
                at += HV_PAGE_SIZE;
                continue;
            }
            uint64_t end = at;
            while (end < ranges[i].end && !ram_hole(d, end & ~(HV_PAGE_SIZE - 1)))
                end = (end & ~(HV_PAGE_SIZE - 1)) + HV_PAGE_SIZE;
            if (end > ranges[i].end)
                end = ranges[i].end;
            uint32_t id = first ? i : next_extra++;
            if (id >= 32) {
                hv_set_error(err, err_len, "too many holes in guest RAM for KVM's memslots");
                return -1;
            }
            if (set_slot(d, id, at, end, ranges[i].flags, err, err_len) < 0)
                return -1;
            used |= 1u << id;
            d->kvm_ram_slots = used;
            first = 0;
            at = end;
        }
    }
    return 0;
}

static int kvm_create_vm(struct hv_domain *d, char *err, int err_len)
{
    if (!kvm_available(err, err_len))
        return -1;
    d->kvm_vm_fd = ioctl(kvm_fd, KVM_CREATE_VM, 0);
    if (d->kvm_vm_fd < 0) {
        hv_set_error(err, err_len, "KVM_CREATE_VM: %s", strerror(errno));
        return -1;
    }
    if (ioctl(d->kvm_vm_fd, KVM_SET_TSS_ADDR, TSS_ADDR) < 0 && errno != ENOTTY) {
        hv_set_error(err, err_len, "KVM_SET_TSS_ADDR: %s", strerror(errno));
        goto fail;
    }
    d->kvm_ram_slots = 0;
    if (layout_ram_slots(d, err, err_len) < 0)
        goto fail;
    /* The hypervisor's region; the guest reaches it only through our mappings. */
    if (d->pv_region && map_slot(d, 3, PV_REGION_GPA, PV_REGION_GPA + d->pv_region_bytes, 0,
                                 d->pv_region, err, err_len) < 0)
        goto fail;
    if (d->guest_type == HV_GUEST_PVH && pvh_setup_vm(d, err, err_len) < 0)
        goto fail;
    return 0;
fail:
    close(d->kvm_vm_fd);
    d->kvm_vm_fd = -1;
    return -1;
}

/* ---- PVH: the hypercall-page MSR, the Xen CPUID leaves, the 32-bit entry (pvh.c) ---- */

/* Can this host's KVM run a PVH guest? It must let the VMM see the guest's write to
 * the hypercall-page MSR: a user-space MSR exit through an MSR filter. */
static int kvm_pvh_available(char *why, int why_len)
{
    if (!kvm_available(why, why_len))
        return 0;
    if (ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_X86_USER_SPACE_MSR) <= 0 ||
        ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_X86_MSR_FILTER) <= 0) {
        hv_set_error(why, why_len, "/dev/kvm lacks KVM_CAP_X86_USER_SPACE_MSR or "
                     "KVM_CAP_X86_MSR_FILTER, which a PVH guest's hypercall-page MSR needs");
        return 0;
    }
    return 1;
}

int hv_kvm_pvh_available(char *why, int why_len)
{
    return kvm_pvh_available(why, why_len);
}

int hv_kvm_has_xen_hvm(void)
{
    pthread_once(&kvm_once, kvm_open_once);
    return kvm_fd >= 0 && ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_XEN_HVM) > 0;
}

/* Writes to the hypercall-page MSR leave KVM_RUN (KVM_EXIT_X86_WRMSR); every other MSR
 * stays KVM's. */
static int pvh_setup_vm(struct hv_domain *d, char *err, int err_len)
{
    static uint8_t deny_one = 0;        /* bit 0 clear: the write is filtered */
    struct kvm_enable_cap cap = { .cap = KVM_CAP_X86_USER_SPACE_MSR,
                                  .args = { KVM_MSR_EXIT_REASON_FILTER } };
    struct kvm_msr_filter filter = {
        .flags = KVM_MSR_FILTER_DEFAULT_ALLOW,
        .ranges = { { .flags = KVM_MSR_FILTER_WRITE, .nmsrs = 1,
                      .base = HV_PVH_HYPERCALL_MSR, .bitmap = &deny_one } },
    };
    if (!kvm_pvh_available(err, err_len))
        return -1;
    if (ioctl(d->kvm_vm_fd, KVM_ENABLE_CAP, &cap) < 0) {
        hv_set_error(err, err_len, "KVM_ENABLE_CAP(KVM_CAP_X86_USER_SPACE_MSR): %s", strerror(errno));
        return -1;
    }
    if (ioctl(d->kvm_vm_fd, KVM_X86_SET_MSR_FILTER, &filter) < 0) {
        hv_set_error(err, err_len, "KVM_X86_SET_MSR_FILTER: %s", strerror(errno));
        return -1;
    }
    return 0;
}

#define CPUID1_ECX_X2APIC (1u << 21)

/* Replace KVM's own hypervisor leaves (0x4000xxxx) with Xen's; and the local APIC is
 * trapless's (dev_lapic.c), which offers xAPIC mode only: KVM, which would answer the
 * x2APIC MSRs with #GP without its own in-kernel APIC, must not offer x2APIC. */
static void pvh_cpuid(struct hv_vcpu *v, struct kvm_cpuid2 *cpuid, int room)
{
    uint32_t n = 0, out[4];
    for (uint32_t i = 0; i < cpuid->nent; i++) {
        if (cpuid->entries[i].function == 1)
            cpuid->entries[i].ecx &= ~CPUID1_ECX_X2APIC;
        if ((cpuid->entries[i].function & 0xffff0000u) != HV_PVH_CPUID_BASE)
            cpuid->entries[n++] = cpuid->entries[i];
    }
    for (uint32_t leaf = HV_PVH_CPUID_BASE; leaf < HV_PVH_CPUID_BASE + 6; leaf++) {
        uint32_t subleaves = leaf == HV_PVH_CPUID_BASE + 3 ? 3 : 1;
        for (uint32_t sub = 0; sub < subleaves && (int)n < room; sub++) {
            struct kvm_cpuid_entry2 *e = &cpuid->entries[n++];
            memset(e, 0, sizeof(*e));
            hv_pvh_cpuid(v, leaf, sub, out);
            e->function = leaf;
            e->index = sub;
            e->flags = leaf == HV_PVH_CPUID_BASE + 3 || leaf == HV_PVH_CPUID_BASE + 4
                       ? KVM_CPUID_FLAG_SIGNIFCANT_INDEX : 0;
            e->eax = out[0];
            e->ebx = out[1];
            e->ecx = out[2];
            e->edx = out[3];
        }
    }
    cpuid->nent = n;
}

static int kvm_get_mode(struct hv_vcpu *v, struct hv_cpu_mode *m)
{
    struct kvm_sregs own, *sregs = &v->run->s.regs.sregs;
    if (!(v->run->kvm_valid_regs & KVM_SYNC_X86_SREGS)) {
        if (ioctl(v->fd, KVM_GET_SREGS, &own) < 0)
            return -1;
        sregs = &own;
    }
    m->cr0 = sregs->cr0;
    m->cr4 = sregs->cr4;
    m->efer = sregs->efer;
    m->cs_long = sregs->cs.l;
    m->cpl = sregs->cs.dpl;
    return 0;
}

static void flat_segment(struct kvm_segment *s, uint16_t selector, int code);

/* What every guest starts with: flat code and data segments from the builder's GDT, a
 * busy TSS (VM entry insists on one), no LDT, no IDT (the guest installs its own). */
static void boot_segments(struct kvm_sregs *s, const struct hv_boot_state *bs)
{
    flat_segment(&s->cs, bs->code_selector, 1);
    flat_segment(&s->ds, bs->data_selector, 0);
    s->es = s->fs = s->gs = s->ss = s->ds;
    memset(&s->tr, 0, sizeof(s->tr));
    s->tr.limit = 0x67;
    s->tr.type = 0xb;
    s->tr.present = 1;
    memset(&s->ldt, 0, sizeof(s->ldt));
    s->ldt.type = 0x2;
    s->ldt.unusable = 1;
    s->gdt.base = bs->gdt_base;
    s->gdt.limit = bs->gdt_limit;
    s->idt.base = 0;
    s->idt.limit = 0;
}

/* 32-bit flat protected mode, paging off, ebx = hvm_start_info (XEN-ABI-FACTS 26). */
static int pvh_boot_state(struct hv_vcpu *v, const struct hv_boot_state *bs, char *err, int err_len)
{
    struct kvm_sregs sregs;
    struct kvm_regs regs;

    if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0) {
        hv_set_error(err, err_len, "KVM_GET_SREGS: %s", strerror(errno));
        return -1;
    }
    boot_segments(&sregs, bs);
    sregs.cs.l = 0;
    sregs.cs.db = 1;                /* 32-bit code: attributes 0xc9b */
    sregs.cr0 = 0x11;               /* ET PE */
    sregs.cr3 = 0;
    sregs.cr4 = 0;
    sregs.efer = 0;
    if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0) {
        hv_set_error(err, err_len, "KVM_SET_SREGS: %s", strerror(errno));
        return -1;
    }
    memset(&regs, 0, sizeof(regs));
    regs.rip = bs->rip;
    regs.rbx = bs->rbx;
    regs.rflags = 0x2;
    if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0) {
        hv_set_error(err, err_len, "KVM_SET_REGS: %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* The PVH hypercall page's `out`: the VMM hands the result back in rax. */
static void pvh_hypercall_exit(struct hv_vcpu *v, struct kvm_run *run)
{
    struct kvm_regs *regs = &run->s.regs.regs;
    struct hv_pvh_regs r = { .rax = regs->rax, .rbx = regs->rbx, .rcx = regs->rcx,
                             .rdx = regs->rdx, .rsi = regs->rsi, .rdi = regs->rdi,
                             .r8 = regs->r8, .r10 = regs->r10 };
    v->cr3 = run->s.regs.sregs.cr3;     /* the hypercall's pointers walk these tables */
    v->cr3_valid = 1;
    regs->rax = hv_pvh_hypercall(v, &r);
    run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
}

/* ---- PVH: events from ring 3 ----
 * This host (PVM-HOST.md) turns a ring-3 `int n` into #UD and delivers that through
 * the guest's IDT itself, never telling us; it also skips the gate's DPL check for
 * int3. Every event from ring 3 reads the new stack pointer from the guest's TSS
 * (RSP0, or an IST slot) before anything else. So the guest-physical pages of the
 * guest's TSS stay out of KVM's memslots: that read fails, and KVM stops the vCPU
 * with KVM_EXIT_SHUTDOWN still at the user instruction, the exception it meant to
 * deliver in its vCPU events and a #PF's address in CR2 (measured: the report's
 * experiments). kvm_emul.c then delivers the event as the CPU would. The guest's own
 * accesses to those pages are MMIO exits, served from RAM. The TSS is wherever the
 * guest's TR says; its `ltr` runs inside KVM, so every exit compares TR and cr3 with
 * what the pages were found with. Interrupts for a vCPU in ring 3 are delivered by
 * kvm_emul.c too (KVM would stop on them the same way). */

/* Move the holes to the TSS TR names now (long mode, a TR the guest loaded). */
static int pvh_track_tss(struct hv_vcpu *v, char *err, int err_len)
{
    struct kvm_sregs *s = &v->run->s.regs.sregs;
    uint64_t want[2] = { HV_NO_PAGE, HV_NO_PAGE }, first, last;

    if (s->tr.base == v->tss_seen_base && s->tr.selector == v->tss_seen_sel &&
        s->cr3 == v->tss_seen_cr3)
        return 0;
    v->tss_seen_base = s->tr.base;
    v->tss_seen_sel = s->tr.selector;
    v->tss_seen_cr3 = s->cr3;
    if ((s->efer & (1ULL << 10)) && (s->tr.selector & ~7) && s->tr.present &&
        hv_gva_to_gpa(v, s->tr.base, 0, &first) == 0 &&
        hv_gva_to_gpa(v, s->tr.base + 0x67, 0, &last) == 0 &&     /* a 64-bit TSS's end */
        last + 1 <= v->dom->ram_bytes) {
        want[0] = first & ~(HV_PAGE_SIZE - 1);
        want[1] = last & ~(HV_PAGE_SIZE - 1);
        if (want[1] == want[0])
            want[1] = HV_NO_PAGE;
    }
    if (want[0] == v->tss_trap[0] && want[1] == v->tss_trap[1])
        return 0;
    v->tss_trap[0] = want[0];
    v->tss_trap[1] = want[1];
    return layout_ram_slots(v->dom, err, err_len);
}

/* A guest access to a page kept from KVM: RAM all the same. (Any page of RAM: while
 * layout_ram_slots() moves a hole, another vCPU may find its page between slots.) */
static int pvh_hole_mmio(struct hv_vcpu *v, struct kvm_run *run)
{
    struct hv_domain *d = v->dom;
    uint64_t gpa = run->mmio.phys_addr, len = run->mmio.len;

    if (d->guest_type != HV_GUEST_PVH || len > 8 || gpa + len > d->ram_bytes)
        return 0;
    if (run->mmio.is_write)
        memcpy(d->ram + gpa, run->mmio.data, len);
    else
        memcpy(run->mmio.data, d->ram + gpa, len);
    return 1;
}

static int pvh_tss_trapped(struct hv_vcpu *v)
{
    return v->dom->guest_type == HV_GUEST_PVH && v->tss_trap[0] != HV_NO_PAGE;
}

/* CPUID faulting (MSR_PLATFORM_INFO bit 31): KVM offers it, but ring-3 code runs
 * natively on a KVM-PVM host and its cpuid never faults, and trapless cannot see it
 * either; so a PVH guest is not told it exists (XTF cpuid-faulting then skips). */
#define MSR_PLATFORM_INFO               0xce
#define PLATFORM_INFO_CPUID_FAULTING    (1ULL << 31)

static int pvh_vcpu_msrs(struct hv_vcpu *v, char *err, int err_len)
{
    struct { struct kvm_msrs hdr; struct kvm_msr_entry e; } msrs = {
        .hdr.nmsrs = 1, .e.index = MSR_PLATFORM_INFO,
    };
    if (ioctl(v->fd, KVM_GET_MSRS, &msrs) != 1)
        return 0;                       /* no such MSR: nothing is offered */
    if (!(msrs.e.data & PLATFORM_INFO_CPUID_FAULTING))
        return 0;
    msrs.e.data &= ~PLATFORM_INFO_CPUID_FAULTING;
    if (ioctl(v->fd, KVM_SET_MSRS, &msrs) != 1) {
        hv_set_error(err, err_len, "KVM_SET_MSRS (MSR_PLATFORM_INFO): %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* ---- end of PVH ---- */

int hv_kvm_vcpu_events(struct hv_vcpu *v, struct kvm_vcpu_events *ev)
{
    if (v->run->kvm_valid_regs & KVM_SYNC_X86_EVENTS) {
        *ev = v->run->s.regs.events;
        return 0;
    }
    return ioctl(v->fd, KVM_GET_VCPU_EVENTS, ev) < 0 ? -1 : 0;
}

static void kvm_destroy_vm(struct hv_domain *d)
{
    if (d->kvm_vm_fd >= 0)
        close(d->kvm_vm_fd);
    d->kvm_vm_fd = -1;
}

/* ---- engine ops ---- */

static int kvm_get_cr3(struct hv_vcpu *v, uint64_t *cr3)
{
    if (!v->cr3_valid) {
        struct kvm_sregs sregs;
        if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
            return -1;
        v->cr3 = sregs.cr3;
        v->cr3_valid = 1;
    }
    *cr3 = v->cr3;
    return 0;
}

/* KVM rebuilds its MMU context, flushing the guest's translations, whenever a
 * KVM_SET_SREGS changes cr3 or cr4. There is no flush ioctl, so a flush with the same
 * cr3 toggles CR4.PGE and puts it back. */
/* Register changes a hypercall asks for wait until KVM has completed the hypercall's
 * `in`: a KVM_SET_SREGS while it is pending makes the guest execute the `in` again on
 * some hosts (PVM). The run loop applies them right after (apply_pending). vCPU thread
 * only, hence thread-local. */
static __thread int in_exit, pending_set_cr3, pending_flush;
/* the vector KVM_INTERRUPT gave KVM for the next entry, -1 if none: KVM delivers it
 * before any instruction, so a KVM_EXIT_SHUTDOWN right after is that delivery's */
static __thread int injected_vector = -1;
static __thread uint64_t pending_cr3;

/* A ring-3 guest kernel's tables are shadowed by a KVM that shadows (KVM-PVM): trapless
 * writes their entries from the host, which KVM does not see, and no CR4.PGE toggle
 * drops a shadow page KVM believes in sync. Taking the memslot that holds the tables
 * away and back makes KVM forget every shadow of it (ring-0 guests do not need this:
 * KVM-PVM emulates their code and walks the tables afresh). Under Xen's model any frame
 * of RAM may be a table, so that is the RAM slot (2); a ring-0 kernel's tables are in
 * the pool's (1). Only after a present entry of a table in use changed (mm.c) and was
 * not shown to KVM entry by entry (the rewrite routine below, which an exit of a
 * Xen-model domain normally takes): it costs about 1.2 ms here, and KVM then rebuilds
 * the shadows it needs. */
static int drop_shadows(struct hv_domain *d)
{
    if (d->pv_model != HV_PV_XEN ||
        !__atomic_exchange_n(&d->mm.live_entry_changed, 0, __ATOMIC_ACQ_REL))
        return 0;
    int pool = d->pt_pool_end > d->pt_pool_start;
    uint64_t start = pool ? d->pt_pool_start : d->pt_pool_end;
    uint64_t end = pool ? d->pt_pool_end : d->ram_bytes + d->gnt_bytes;
    struct kvm_userspace_memory_region r = {
        .slot = pool ? 1 : 2, .flags = pool ? KVM_MEM_READONLY : 0,
        .guest_phys_addr = start, .memory_size = 0,
        .userspace_addr = (uint64_t)(uintptr_t)(d->ram + start),
    };
    if (ioctl(d->kvm_vm_fd, KVM_SET_USER_MEMORY_REGION, &r) < 0)
        return -1;
    r.memory_size = end - start;
    return ioctl(d->kvm_vm_fd, KVM_SET_USER_MEMORY_REGION, &r);
}

/* Showing KVM the entries of tables in use that an exit changed from the host (see
 * drop_shadows). KVM-PVM emulates ring-0 code, and an emulated write to a table it
 * shadows updates its shadow of that one entry: so the way back to the guest goes
 * through the rewrite routine (pv_region.c), about ten emulated instructions where
 * dropping the memslot costs about 1.2 ms and every shadow. An event that comes due
 * while the routine runs waits for the next exit (pv_events leaves the area alone), as
 * one due in a stub's last two instructions does. */

/* From an exception stub: its `out` returns into the routine, which jumps back. */
static void rewrite_from_stub(struct hv_vcpu *v, const struct hv_mm_changed *c)
{
    struct kvm_regs *kr = &v->run->s.regs.regs;
    kr->rip = pv_rewrite_entries(v, c->gpa, c->n, kr->rip);
    v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
}

/* From the landing page's exit in ring 3 (the registers already r's in sync regs): the
 * guest goes back as from a stub, with r's iret frame and rax on its ring-0 stack, cs
 * and ss ring 0's in *sregs, and the routine jumping to stub 0's pop %rax; iretq. */
static void rewrite_from_ring3(struct hv_vcpu *v, const struct hv_mm_changed *c,
                               const struct pv_regs *r, struct kvm_sregs *sregs)
{
    struct kvm_regs *kr = &v->run->s.regs.regs;
    uint64_t *frame = (uint64_t *)(pv_vcpu_stack(v) + 2 * 4096) - 6;

    frame[0] = r->rax;
    frame[1] = r->rip;
    frame[2] = r->cs | 3;
    frame[3] = r->rflags;
    frame[4] = r->rsp;
    frame[5] = r->ss | 3;
    kr->rip = pv_rewrite_entries(v, c->gpa, c->n, PV_STUB_RESUME_VA);
    kr->rsp = PV_VCPU_VA(v->id, PV_STACK_TOP) - 6 * 8;
    kr->rflags = 0x2;                   /* as an interrupt gate leaves it */
    v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
    flat_segment(&sregs->cs, PV_HYPER_CS, 1);
    flat_segment(&sregs->ss, PV_HYPER_DS, 0);
}

/* The same once the exit's `out` is complete, with the segments set by ioctl. */
static int rewrite_from_ring3_now(struct hv_vcpu *v, const struct hv_mm_changed *c,
                                  const struct pv_regs *r)
{
    struct kvm_sregs sregs;
    if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
        return -1;
    rewrite_from_ring3(v, c, r, &sregs);
    return ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0 ? -1 : 0;
}

/* Where neither can be done, the next flush or new cr3 drops the memslot. */
static void drop_at_next_flush(struct hv_domain *d, const struct hv_mm_changed *c)
{
    if (c->n)
        __atomic_store_n(&d->mm.live_entry_changed, 1, __ATOMIC_RELEASE);
}

static int apply_sregs(struct hv_vcpu *v, int set_cr3, uint64_t cr3, int flush)
{
    struct kvm_sregs sregs;
    if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
        return -1;
    if ((set_cr3 || flush) && drop_shadows(v->dom) < 0)
        return -1;
    if (set_cr3 && sregs.cr3 != cr3) {
        sregs.cr3 = cr3;            /* a new cr3 is itself a flush */
        if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0)
            return -1;
        v->cr3 = cr3;
        v->cr3_valid = 1;
        return 0;
    }
    if (!set_cr3 && !flush)
        return 0;
    sregs.cr4 ^= 1ULL << 7;         /* PGE */
    if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0)
        return -1;
    sregs.cr4 ^= 1ULL << 7;
    return ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0 ? -1 : 0;
}

static int kvm_set_cr3(struct hv_vcpu *v, uint64_t cr3)
{
    if (in_exit) {
        pending_set_cr3 = 1;
        pending_cr3 = cr3;
        v->cr3 = cr3;               /* the rest of the hypercall already sees it */
        v->cr3_valid = 1;
        return 0;
    }
    return apply_sregs(v, 1, cr3, 0);
}

static int kvm_flush_tlb(struct hv_vcpu *v)
{
    if (in_exit) {
        pending_flush = 1;
        return 0;
    }
    return apply_sregs(v, 0, 0, 1);
}

/* Complete the pending port I/O without entering the guest (immediate_exit). */
static int complete_io(struct hv_vcpu *v)
{
    int rc;
    __atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    rc = ioctl(v->fd, KVM_RUN, 0);
    __atomic_store_n(&v->run->immediate_exit, 0, __ATOMIC_SEQ_CST);
    return rc == 0 || (errno != EINTR && errno != EAGAIN) ? -1 : 0;
}

/* Complete the pending I/O (unless `completed`), then change the registers the
 * hypercall asked for. */
static int apply_pending(struct hv_vcpu *v, int completed)
{
    int set_cr3 = pending_set_cr3, flush = pending_flush;
    pending_set_cr3 = pending_flush = 0;
    if (!set_cr3 && !flush)
        return 0;
    if (!completed && complete_io(v) < 0)
        return -1;
    return apply_sregs(v, set_cr3, pending_cr3, flush);
}

static void kvm_kick(struct hv_vcpu *v)
{
    pthread_mutex_lock(&v->kick_lock);
    __atomic_store_n(&v->run->immediate_exit, 1, __ATOMIC_SEQ_CST);
    if (v->in_run && !pthread_equal(v->thread, pthread_self()))
        pthread_kill(v->thread, KICK_SIGNAL);
    pthread_mutex_unlock(&v->kick_lock);
    /* and its twin, which may run the vCPU now (a kick it did not need is counted on its
     * way in, as KVM counts an immediate_exit) */
    if (v->engine_priv)
        hv_twin_kick(v);
}

static const struct hv_engine_ops kvm_ops = {
    .get_cr3 = kvm_get_cr3,
    .kick = kvm_kick,
    .set_cr3 = kvm_set_cr3,
    .flush_tlb = kvm_flush_tlb,
    .get_mode = kvm_get_mode,
};

/* ---- vCPUs ---- */

static int set_cpuid(struct hv_vcpu *v, char *err, int err_len)
{
    int nent = 256, rc = -1;
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + nent * sizeof(struct kvm_cpuid_entry2));
    if (!cpuid) {
        hv_set_error(err, err_len, "out of host memory");
        return -1;
    }
    cpuid->nent = nent;
    if (ioctl(kvm_fd, KVM_GET_SUPPORTED_CPUID, cpuid) < 0) {
        hv_set_error(err, err_len, "KVM_GET_SUPPORTED_CPUID: %s", strerror(errno));
        free(cpuid);
        return -1;
    }
    if (v->dom->guest_type == HV_GUEST_PVH)
        pvh_cpuid(v, cpuid, nent);
    if (v->dom->pv_model == HV_PV_XEN) {
        /* a native cpuid tells what the PV policy does (pv_cpuid): no FSGSBASE */
        for (uint32_t i = 0; i < cpuid->nent; i++)
            if (cpuid->entries[i].function == 7 && cpuid->entries[i].index == 0)
                cpuid->entries[i].ebx &= ~1u;
    }
    if (ioctl(v->fd, KVM_SET_CPUID2, cpuid) < 0)
        hv_set_error(err, err_len, "KVM_SET_CPUID2: %s", strerror(errno));
    else
        rc = 0;
    free(cpuid);
    return rc;
}

/* The PV clock needs the guest's TSC: host TSC + the offset KVM applies, at the rate
 * KVM reports. KVM_VCPU_TSC_OFFSET gives the offset exactly; older kernels get it
 * from the guest's IA32_TSC read next to the host's TSC. */
static int pvclock_setup(struct hv_vcpu *v, char *err, int err_len)
{
    int64_t offset = 0;
    struct kvm_device_attr attr = {
        .group = KVM_VCPU_TSC_CTRL, .attr = KVM_VCPU_TSC_OFFSET, .addr = (uint64_t)(uintptr_t)&offset,
    };
    int khz = ioctl(v->fd, KVM_GET_TSC_KHZ, 0);

    if (khz <= 0) {
        hv_set_error(err, err_len, "KVM_GET_TSC_KHZ: %s", strerror(errno));
        return -1;
    }
    /* Xen's model: the guest's TSC is the host's, as a Xen PV guest's rdtsc runs
     * natively there; so is the TSC of the Unicorn twin that runs its compat code
     * (bt_twin.c: TCG's rdtsc reads the host's). Where KVM will not, its offset stays. */
    if (v->dom->pv_model == HV_PV_XEN)
        ioctl(v->fd, KVM_SET_DEVICE_ATTR, &attr);
    if (ioctl(v->fd, KVM_GET_DEVICE_ATTR, &attr) < 0) {
        struct { struct kvm_msrs hdr; struct kvm_msr_entry e; } msrs = {
            .hdr.nmsrs = 1, .e.index = 0x10,   /* IA32_TSC */
        };
        uint64_t before = __rdtsc();
        if (ioctl(v->fd, KVM_GET_MSRS, &msrs) != 1) {
            hv_set_error(err, err_len, "cannot read the guest TSC: %s", strerror(errno));
            return -1;
        }
        offset = (int64_t)(msrs.e.data - (before + (__rdtsc() - before) / 2));
    }
    return hv_pvclock_init(v, offset, (uint64_t)khz);
}

static int kvm_vcpu_create(struct hv_vcpu *v, char *err, int err_len)
{
    v->ops = &kvm_ops;
    v->run_size = (size_t)kvm_run_size;
    v->tss_trap[0] = v->tss_trap[1] = HV_NO_PAGE;
    v->tss_seen_base = v->tss_seen_cr3 = 0;
    v->tss_seen_sel = 0;
    v->fd = ioctl(v->dom->kvm_vm_fd, KVM_CREATE_VCPU, v->id);
    if (v->fd < 0) {
        hv_set_error(err, err_len, "KVM_CREATE_VCPU: %s", strerror(errno));
        return -1;
    }
    v->run = mmap(NULL, v->run_size, PROT_READ | PROT_WRITE, MAP_SHARED, v->fd, 0);
    if (v->run == MAP_FAILED) {
        hv_set_error(err, err_len, "mmap of kvm_run: %s", strerror(errno));
        v->run = NULL;
        close(v->fd);
        return -1;
    }
    /* Xen's PV model needs cr2, cr3 and the segments at every exit, PVH its mode; and
     * PVH the event KVM stopped on at each ring-3 exception or port access (kvm_emul.c),
     * which sync regs hand over without an ioctl of its own (one costs about a third
     * of an exit on a nested host) */
    v->run->kvm_valid_regs = KVM_SYNC_X86_REGS;
    if (v->dom->pv_model == HV_PV_XEN || v->dom->guest_type == HV_GUEST_PVH)
        v->run->kvm_valid_regs |= KVM_SYNC_X86_SREGS;
    if (v->dom->guest_type == HV_GUEST_PVH &&
        (ioctl(kvm_fd, KVM_CHECK_EXTENSION, KVM_CAP_SYNC_REGS) & KVM_SYNC_X86_EVENTS))
        v->run->kvm_valid_regs |= KVM_SYNC_X86_EVENTS;
    /* the PV clock first: a PVH guest's CPUID time leaf tells its scale */
    if (pvclock_setup(v, err, err_len) < 0 || set_cpuid(v, err, err_len) < 0 ||
        (v->dom->guest_type == HV_GUEST_PVH && pvh_vcpu_msrs(v, err, err_len) < 0)) {
        munmap(v->run, v->run_size);
        v->run = NULL;
        close(v->fd);
        return -1;
    }
    return 0;
}

static void kvm_vcpu_destroy(struct hv_vcpu *v)
{
    hv_twin_destroy(v);
    free(v->twin_xsave);
    if (v->run)
        munmap(v->run, v->run_size);
    close(v->fd);
}

static void flat_segment(struct kvm_segment *s, uint16_t selector, int code)
{
    memset(s, 0, sizeof(*s));
    s->selector = selector;
    s->base = 0;
    s->limit = 0xffffffff;
    s->type = code ? 0xb : 0x3;     /* execute/read or read/write, accessed */
    s->present = 1;
    s->s = 1;
    s->l = code ? 1 : 0;
    s->db = code ? 0 : 1;
    s->g = 1;
}

/* Xen's model: ring 3 on Xen's flat selectors, the hypervisor's GDT, IDT and TSS, and
 * syscall aimed at the landing page. */
static int pv_boot_sregs(struct hv_vcpu *v, struct kvm_sregs *sregs, char *err, int err_len)
{
    struct {
        struct kvm_msrs hdr;
        struct kvm_msr_entry e[4];
    } msrs = {
        .hdr.nmsrs = 4,
        .e = {
            /* STAR names Xen's selectors; this host keeps ring 3 on syscall anyway */
            { .index = 0xc0000081, .data = (uint64_t)FLAT_RING3_CS32 << 48 | (uint64_t)PV_HYPER_CS << 32 },
            { .index = 0xc0000082, .data = PV_LANDING_VA },             /* LSTAR */
            { .index = 0xc0000083, .data = PV_LANDING32_VA },           /* CSTAR */
            { .index = 0xc0000084, .data = 0x44500 },   /* SFMASK: TF DF NT AC; IF stays */
        },
    };
    flat_segment(&sregs->cs, FLAT_KERNEL_CS, 1);
    sregs->cs.dpl = 3;
    flat_segment(&sregs->ss, FLAT_KERNEL_SS, 0);
    sregs->ss.dpl = 3;
    /* DS, ES, FS, GS start null, as Xen starts them */
    flat_segment(&sregs->ds, 0, 0);
    sregs->ds.dpl = 3;
    sregs->ds.present = 0;
    sregs->ds.unusable = 1;
    sregs->es = sregs->fs = sregs->gs = sregs->ds;
    memset(&sregs->tr, 0, sizeof(sregs->tr));
    sregs->tr.selector = PV_TSS_SEL;
    sregs->tr.base = PV_VCPU_VA(v->id, PV_TSS_VA);
    sregs->tr.limit = PV_TSS_LIMIT;
    sregs->tr.type = 0xb;
    sregs->tr.present = 1;
    sregs->gdt.base = PV_VCPU_VA(v->id, PV_GDT_VA);
    sregs->gdt.limit = PV_GDT_LIMIT;
    sregs->idt.base = PV_IDT_VA;
    sregs->idt.limit = 256 * 16 - 1;
    sregs->efer |= 1;               /* SCE */
    if (ioctl(v->fd, KVM_SET_MSRS, &msrs) != (int)msrs.hdr.nmsrs) {
        hv_set_error(err, err_len, "KVM_SET_MSRS (syscall MSRs): %s", strerror(errno));
        return -1;
    }
    return 0;
}

static int kvm_set_boot_state(struct hv_vcpu *v, const struct hv_boot_state *bs, char *err, int err_len)
{
    struct kvm_sregs sregs;
    struct kvm_regs regs;
    struct kvm_fpu fpu;
    int xen = v->dom->pv_model == HV_PV_XEN;

    if (bs->mode == HV_BOOT_PVH32 && pvh_boot_state(v, bs, err, err_len) < 0)
        return -1;
    if (bs->mode == HV_BOOT_PVH32)
        goto fpu;
    if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0) {
        hv_set_error(err, err_len, "KVM_GET_SREGS: %s", strerror(errno));
        return -1;
    }
    boot_segments(&sregs, bs);
    sregs.cr0 = 0x80050033;         /* PG WP NE ET MP PE */
    sregs.cr3 = bs->cr3;
    sregs.cr4 = 0x620;              /* OSXMMEXCPT OSFXSR PAE */
    sregs.efer = 0xd00;             /* NXE LMA LME */
    if (xen && pv_boot_sregs(v, &sregs, err, err_len) < 0)
        return -1;
    if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0) {
        hv_set_error(err, err_len, "KVM_SET_SREGS: %s", strerror(errno));
        return -1;
    }
    memset(&regs, 0, sizeof(regs));
    regs.rip = bs->rip;
    regs.rsp = bs->rsp;
    regs.rsi = bs->rsi;
    /* ring 0: interrupts off until the guest is ready; Xen's: IF on, events masked */
    regs.rflags = xen ? 0x202 : 0x2;
    if (xen)
        pv_vcpu_boot(v, bs->rsp);
    if (ioctl(v->fd, KVM_SET_REGS, &regs) < 0) {
        hv_set_error(err, err_len, "KVM_SET_REGS: %s", strerror(errno));
        return -1;
    }
fpu:
    memset(&fpu, 0, sizeof(fpu));
    fpu.fcw = 0x37f;
    fpu.mxcsr = 0x1f80;
    if (ioctl(v->fd, KVM_SET_FPU, &fpu) < 0) {
        hv_set_error(err, err_len, "KVM_SET_FPU: %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* ---- the run loop ---- */

static void port_io(struct hv_vcpu *v, struct kvm_run *run)
{
    struct kvm_regs *regs = &run->s.regs.regs;
    uint8_t *data = (uint8_t *)run + run->io.data_offset;

    if (run->io.port == TRAPLESS_HYPERCALL_PORT && run->io.direction == KVM_EXIT_IO_IN &&
        run->io.size == 4 && run->io.count == 1) {
        /* The stub's `in eax` takes the result back: KVM writes eax as it completes the
         * instruction, so no register set (and its cost) is needed on the way in. */
        struct hv_hcall h = {
            .nr = regs->rax, .a1 = regs->rdi, .a2 = regs->rsi,
            .a3 = regs->rdx, .a4 = regs->r10, .a5 = regs->r8,
        };
        int64_t ret;
        v->dom->counters.exits[HV_EXIT_HYPERCALL]++;
        ret = hv_hypercall(v, &h);
        int32_t result = ret == (int32_t)ret ? (int32_t)ret : -XEN_EOVERFLOW;
        memcpy(data, &result, 4);
        return;
    }
    if (v->dom->guest_type == HV_GUEST_PVH && run->io.port == TRAPLESS_HYPERCALL_PORT &&
        run->io.direction == KVM_EXIT_IO_OUT && run->io.size == 4 && run->io.count == 1) {
        pvh_hypercall_exit(v, run);
        return;
    }
    v->dom->counters.exits[HV_EXIT_IO]++;
    for (uint32_t i = 0; i < run->io.count; i++) {
        uint8_t *item = data + (size_t)i * run->io.size;
        if (hv_devices_port_io(v, run->io.port, run->io.size,
                               run->io.direction == KVM_EXIT_IO_OUT, item))
            continue;
        /* A port nobody claims: reads float high, writes vanish, as on real hardware. */
        v->dom->counters.unknown_port_io++;
        if (run->io.direction == KVM_EXIT_IO_IN)
            memset(item, 0xff, run->io.size);
    }
}

/* ---- Xen's PV CPU model: its two exits, and events before each entry ---- */

static void pv_regs_from_run(struct hv_vcpu *v, struct pv_regs *r)
{
    const struct kvm_sync_regs *s = &v->run->s.regs;
    memcpy(r, &s->regs, 18 * sizeof(uint64_t));     /* pv_regs starts in kvm_regs' order */
    r->cs = s->sregs.cs.selector;
    r->ss = s->sregs.ss.selector;
    r->fs_base = s->sregs.fs.base;
    r->gs_base = s->sregs.gs.base;
    r->gs_sel = s->sregs.gs.selector;
}

/* Did the model change what only KVM_SET_SREGS / KVM_SET_DEBUGREGS can load: the FS
 * and GS bases, the %gs selector, CR0.TS, CR4 or the debug registers? */
/* The debug registers the PV model keeps (set_debugreg), into KVM. */
static int set_debugregs(struct hv_vcpu *v, const uint64_t dr[8])
{
    struct kvm_debugregs dbg;
    memset(&dbg, 0, sizeof(dbg));
    memcpy(dbg.db, dr, sizeof(dbg.db));
    dbg.dr6 = dr[6];
    dbg.dr7 = dr[7];
    return ioctl(v->fd, KVM_SET_DEBUGREGS, &dbg) < 0 ? -1 : 0;
}

static int pv_sregs_changed(struct hv_vcpu *v, const struct pv_regs *r, const struct pv_regs *old)
{
    return r->fs_base != old->fs_base || r->gs_base != old->gs_base ||
           r->gs_sel != old->gs_sel || v->pv.hw_dirty;
}

/* Load them. On this KVM-PVM host ring-3 code runs natively under the host's own
 * CR4, so CR4.FSGSBASE there is the host's (rdfsbase works whatever the guest's CR4
 * says); trapless loads the bit anyway for hosts that honour it. */
static int pv_load_sregs(struct hv_vcpu *v, const struct pv_regs *r, const struct pv_regs *old,
                         int in_stub)
{
    struct kvm_sregs sregs;
    const struct pv_vcpu *p = &v->pv;

    if (ioctl(v->fd, KVM_GET_SREGS, &sregs) < 0)
        return -1;
    if (!in_stub && sregs.cs.dpl != 3) {
        /* a `syscall` this host ran as the architecture says (with a non-canonical rsp,
         * or under TF) loaded STAR's ring-0 selectors on the landing page: the guest
         * goes back to ring 3 on Xen's flat ones */
        flat_segment(&sregs.cs, (uint16_t)(r->cs | 3), 1);
        sregs.cs.dpl = 3;
        flat_segment(&sregs.ss, (uint16_t)(r->ss | 3), 0);
        sregs.ss.dpl = 3;
    }
    sregs.fs.base = r->fs_base;
    sregs.gs.base = r->gs_base;
    if (r->gs_sel != old->gs_sel) {
        sregs.gs.selector = (uint16_t)r->gs_sel;
        sregs.gs.unusable = r->gs_sel <= 3;
        sregs.gs.present = r->gs_sel > 3;
        sregs.gs.type = 3;              /* data, read/write, accessed */
        sregs.gs.s = 1;
        sregs.gs.dpl = 3;
        sregs.gs.db = 1;
        sregs.gs.g = 1;
        sregs.gs.limit = 0xffffffff;
    }
    if (p->hw_dirty) {                  /* MMUEXT_SET_LDT: Xen's LDT descriptor */
        memset(&sregs.ldt, 0, sizeof(sregs.ldt));
        sregs.ldt.unusable = !p->ldt_ents;
        if (p->ldt_ents) {
            sregs.ldt.selector = PV_LDT_SEL;
            sregs.ldt.base = PV_VCPU_VA(v->id, PV_LDT_VA);
            sregs.ldt.limit = (uint32_t)(p->ldt_ents * 8 - 1);
            sregs.ldt.type = 2;
            sregs.ldt.present = 1;
        }
    }
    sregs.cr0 = (sregs.cr0 & ~PV_CR0_TS) | (p->cr0_ts ? PV_CR0_TS : 0);
    sregs.cr4 = (sregs.cr4 & ~(PV_CR4_FSGSBASE | PV_CR4_OSXSAVE)) |
                (p->cr4 & (PV_CR4_FSGSBASE | PV_CR4_OSXSAVE));
    if (ioctl(v->fd, KVM_SET_SREGS, &sregs) < 0)
        return -1;
    if (p->hw_dirty && (p->cr4 & PV_CR4_OSXSAVE)) {
        struct kvm_xcrs xcrs;
        memset(&xcrs, 0, sizeof(xcrs));
        xcrs.nr_xcrs = 1;
        xcrs.xcrs[0].xcr = 0;
        xcrs.xcrs[0].value = p->xcr0;
        if (ioctl(v->fd, KVM_SET_XCRS, &xcrs) < 0)
            return -1;
    }
    if (p->hw_dirty) {
        if (set_debugregs(v, p->dr) < 0)
            return -1;
        v->pv.hw_dirty = 0;
    }
    return 0;
}

/* Hand the registers back through sync regs. Inside an exception stub rsp, rip and
 * rflags are the stub's: the guest's go into the iret frame instead. */
static int pv_regs_to_run(struct hv_vcpu *v, const struct pv_regs *r, int in_stub,
                          const struct pv_regs *old)
{
    struct kvm_regs *kr = &v->run->s.regs.regs;
    uint64_t rsp = kr->rsp, rip = kr->rip, rflags = kr->rflags;

    memcpy(kr, r, 18 * sizeof(uint64_t));
    if (in_stub) {
        kr->rsp = rsp;
        kr->rip = rip;
        kr->rflags = rflags;
    }
    v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
    /* a mode switch swapped the GS bases; or set_segment_base, a control register */
    if ((pv_sregs_changed(v, r, old) || (!in_stub && v->run->s.regs.sregs.cs.dpl != 3)) &&
        pv_load_sregs(v, r, old, in_stub) < 0)
        return -1;
    return 0;
}

/* Only what the exception stub restores itself changed: rax (which it pops) and the
 * iret frame's rip, cs, rflags, rsp and ss (a bounce moves rsp to its frame). The stub
 * then resumes the guest with no register write and no extra KVM_RUN to complete its
 * `out` first, which costs as much as a third of an exit here. */
static int only_stub_regs_changed(const struct pv_regs *a, const struct pv_regs *b)
{
    return !memcmp(&a->rbx, &b->rbx, offsetof(struct pv_regs, rsp) - offsetof(struct pv_regs, rbx)) &&
           !memcmp(&a->rbp, &b->rbp, offsetof(struct pv_regs, rip) - offsetof(struct pv_regs, rbp)) &&
           a->fs_base == b->fs_base && a->gs_base == b->gs_base && a->gs_sel == b->gs_sel;
}

/* ---- compat mode: the vCPU's Unicorn twin (bt_twin.c) ----
 * This KVM-PVM host does not run a compat CS that the model loads (the iret hypercall,
 * a bounce's return) as compat code (measured before: a #GP(0) at its first
 * instruction); a far transfer of the guest's own does reach compat mode, but its
 * `syscall` the host then runs as the architecture would from ring 0 (STAR's selectors,
 * CSTAR's low half as rip), faulting there. So while a vCPU of Xen's model runs compat
 * code it runs on its twin, with bt's vCPU code and the same PV model, and comes back
 * when the twin finds it in 64-bit code. Each way costs the state transfer and a flush
 * of the other side's translations (docs/engines.md has the measured round trip). */

/* The x87/SSE state in struct kvm_fpu's terms, through the XSAVE area's legacy region
 * (FXSAVE's layout): this host's KVM_GET_FPU answers MXCSR 0 whatever the guest set
 * (measured: 0 where KVM_GET_XSAVE has the guest's 0x3f80), and KVM_SET_XSAVE leaves
 * the other components (the YMM upper halves) as they are. */
static int get_fpu(struct hv_vcpu *v, struct kvm_fpu *f, struct kvm_xsave *xs)
{
    const uint8_t *x = (const uint8_t *)xs->region;

    if (ioctl(v->fd, KVM_GET_XSAVE, xs) < 0)
        return -1;
    memset(f, 0, sizeof(*f));
    memcpy(&f->fcw, x + 0, 2);
    memcpy(&f->fsw, x + 2, 2);
    f->ftwx = x[4];
    memcpy(&f->last_opcode, x + 6, 2);
    memcpy(&f->last_ip, x + 8, 8);
    memcpy(&f->last_dp, x + 16, 8);
    memcpy(&f->mxcsr, x + 24, 4);
    memcpy(f->fpr, x + 32, sizeof(f->fpr));
    memcpy(f->xmm, x + 160, sizeof(f->xmm));
    return 0;
}

/* xs: the area get_fpu read, which KVM still holds (the vCPU has not run there since). */
static int set_fpu(struct hv_vcpu *v, const struct kvm_fpu *f, struct kvm_xsave *xs)
{
    uint8_t *x = (uint8_t *)xs->region;
    uint64_t bv;

    memcpy(x + 0, &f->fcw, 2);
    memcpy(x + 2, &f->fsw, 2);
    x[4] = f->ftwx;
    memcpy(x + 6, &f->last_opcode, 2);
    memcpy(x + 8, &f->last_ip, 8);
    memcpy(x + 16, &f->last_dp, 8);
    memcpy(x + 24, &f->mxcsr, 4);
    memcpy(x + 32, f->fpr, sizeof(f->fpr));
    memcpy(x + 160, f->xmm, sizeof(f->xmm));
    memcpy(&bv, x + 512, 8);            /* XSTATE_BV: x87 and SSE come from the area */
    bv |= 3;
    memcpy(x + 512, &bv, 8);
    return ioctl(v->fd, KVM_SET_XSAVE, xs) < 0 ? -1 : 0;
}

static struct hv_engine_ops twin_ops;   /* bt's, with kvm's kick (which kicks both) */
static pthread_once_t twin_ops_once = PTHREAD_ONCE_INIT;

/* A flush on the twin (a hypercall's, another vCPU's) is owed to KVM's translations. */
static int twin_flush_tlb(struct hv_vcpu *v)
{
    v->twin_flushed = 1;
    return hv_twin_ops()->flush_tlb(v);
}

static void twin_ops_init(void)
{
    twin_ops = *hv_twin_ops();
    twin_ops.kick = kvm_kick;
    twin_ops.flush_tlb = twin_flush_tlb;
    twin_ops.cpuid = NULL;              /* the PV CPUID policy stays the host's, as on kvm */
}

/* Move the vCPU, whose registers the model left in r, onto its twin. KVM's state is
 * the exit's, in sync regs; a cr3 or flush the exit asked for is the twin's. KVM's
 * pending `out`, if any, stays: the way back gives a new rip by sync regs, and KVM
 * then drops the instruction's completion (as the landing page's fast path does).
 * 0, or -1 with stop filled. */
static int twin_enter(struct hv_vcpu *v, const struct pv_regs *r, struct hv_stop *stop)
{
    const struct kvm_sregs *sregs = &v->run->s.regs.sregs;
    struct kvm_fpu fpu;
    struct hv_twin_segs segs;
    struct pv_step *step = &v->pv.step;
    char err[160] = "";
    uint64_t cr3 = pending_set_cr3 ? pending_cr3 : sregs->cr3;

    v->twin_flushed = pending_flush;
    pending_set_cr3 = pending_flush = 0;
    if (!v->twin_xsave && !(v->twin_xsave = calloc(1, sizeof(*v->twin_xsave))))
        return hv_stop_with(stop, HV_STOP_ERROR, 0, r->rip, "out of host memory"), -1;
    if (get_fpu(v, &fpu, v->twin_xsave) < 0)
        return hv_stop_with(stop, HV_STOP_ERROR, errno, r->rip, "cannot take the vCPU off "
                            "KVM for compat mode: %s", strerror(errno)), -1;
    segs.ds = sregs->ds.selector;
    segs.es = sregs->es.selector;
    segs.fs = sregs->fs.selector;
    memcpy(v->twin_dr, v->pv.dr, sizeof(v->twin_dr));
    v->twin_xcr0 = v->pv.xcr0;
    /* the twin steps breakpoints its own way (bt_debug.c): kvm's step is over */
    step->on = step->decoded = 0;
    step->shadow = 0;
    step->shadow_held = 0;
    pthread_once(&twin_ops_once, twin_ops_init);
    if (hv_twin_enter(v, r, &segs, cr3, &fpu, err, sizeof(err)) < 0)
        return hv_stop_with(stop, HV_STOP_FAULT, 0, r->rip, "compat mode (CS %#llx at rip "
                            "%#llx): this KVM-PVM host does not run 32-bit code in ring 3, "
                            "and its Unicorn twin cannot: %s", (unsigned long long)r->cs,
                            (unsigned long long)r->rip, err), -1;
    v->ops = &twin_ops;
    v->on_twin = 1;
    v->dom->counters.twin_entries++;
    return 0;
}

static void ring3_data_segment(struct kvm_segment *s, uint16_t selector)
{
    flat_segment(s, selector, 0);
    s->dpl = 3;
    s->present = selector > 3;
    s->unusable = selector <= 3;
}

/* The vCPU is in 64-bit code again: its state back into KVM by sync regs (applied by
 * the next KVM_RUN), on ring-3 64-bit segments of the selectors it has, with the
 * control state the model keeps; the XSAVE area it was taken from with the twin's x87
 * and SSE state; the debug registers and XCR0 only if the twin's model changed them.
 * KVM's translations: a new cr3 flushes them, the same one gets a flush before the
 * entry if the twin was asked for one. 0, or -1 with stop filled. */
static int twin_leave(struct hv_vcpu *v, struct hv_stop *stop)
{
    struct kvm_run *run = v->run;
    struct kvm_sregs *s = &run->s.regs.sregs;
    const struct pv_vcpu *p = &v->pv;
    struct kvm_fpu fpu;
    struct hv_twin_segs segs;
    struct pv_regs r;
    uint64_t cr3;

    hv_twin_leave(v, &r, &segs, &cr3, &fpu);
    v->ops = &kvm_ops;
    v->on_twin = 0;
    if (pv_step_resume(v, &r, stop) < 0)    /* breakpoints armed: kvm's step again */
        return -1;
    if (drop_shadows(v->dom) < 0 || set_fpu(v, &fpu, v->twin_xsave) < 0)
        goto fail;
    if (memcmp(v->twin_dr, p->dr, sizeof(v->twin_dr)) || v->twin_xcr0 != p->xcr0) {
        if (set_debugregs(v, p->dr) < 0)
            goto fail;
        if (p->cr4 & PV_CR4_OSXSAVE) {
            struct kvm_xcrs xcrs;
            memset(&xcrs, 0, sizeof(xcrs));
            xcrs.nr_xcrs = 1;
            xcrs.xcrs[0].value = p->xcr0;
            if (ioctl(v->fd, KVM_SET_XCRS, &xcrs) < 0)
                goto fail;
        }
    }
    flat_segment(&s->cs, (uint16_t)(r.cs | 3), 1);
    s->cs.dpl = 3;
    flat_segment(&s->ss, (uint16_t)(r.ss | 3), 0);
    s->ss.dpl = 3;
    ring3_data_segment(&s->ds, segs.ds);
    ring3_data_segment(&s->es, segs.es);
    ring3_data_segment(&s->fs, segs.fs);
    ring3_data_segment(&s->gs, (uint16_t)r.gs_sel);
    s->fs.base = r.fs_base;
    s->gs.base = r.gs_base;
    memset(&s->ldt, 0, sizeof(s->ldt));    /* MMUEXT_SET_LDT's, as pv_load_sregs */
    s->ldt.unusable = !p->ldt_ents;
    if (p->ldt_ents) {
        s->ldt.selector = PV_LDT_SEL;
        s->ldt.base = PV_VCPU_VA(v->id, PV_LDT_VA);
        s->ldt.limit = (uint32_t)(p->ldt_ents * 8 - 1);
        s->ldt.type = 2;
        s->ldt.present = 1;
    }
    s->cr0 = (s->cr0 & ~PV_CR0_TS) | (p->cr0_ts ? PV_CR0_TS : 0);
    s->cr4 = (s->cr4 & ~(PV_CR4_FSGSBASE | PV_CR4_OSXSAVE)) |
             (p->cr4 & (PV_CR4_FSGSBASE | PV_CR4_OSXSAVE));
    if (s->cr3 == cr3 && v->twin_flushed)
        __atomic_store_n(&v->flush_wanted, 1, __ATOMIC_SEQ_CST);
    s->cr3 = cr3;
    memcpy(&run->s.regs.regs, &r, 18 * sizeof(uint64_t));
    run->kvm_dirty_regs |= KVM_SYNC_X86_REGS | KVM_SYNC_X86_SREGS;
    v->pv.hw_dirty = 0;
    v->cr3 = cr3;
    v->cr3_valid = 1;
    return 0;
fail:
    return hv_stop_with(stop, HV_STOP_ERROR, errno, r.rip, "cannot hand the vCPU back to "
                        "KVM after compat mode: %s", strerror(errno)), -1;
}

/* Compat code that a far transfer of the guest's own took there runs natively here, and
 * this host runs its `syscall` as the architecture says: in ring 0 on STAR's selectors at
 * CSTAR's low half, where the fetch faults, and the #PF's frame and the stub's rax go on
 * the guest's stack (sp, below its rsp; i386 code keeps nothing there). 1, and r the
 * registers of that syscall from compat code (rcx and r11 as it set them), if so. */
static int host_compat_syscall(struct hv_vcpu *v, uint64_t sp, struct pv_regs *r)
{
    uint64_t f[7];                      /* rax, error, rip, cs, rflags, rsp, ss */

    if (hv_copy_from_guest(v, f, sp, sizeof(f)) < 0 || f[2] != (uint32_t)PV_LANDING32_VA ||
        (f[3] & 0xffff) != PV_HYPER_CS)
        return 0;
    r->rax = f[0];
    r->rsp = f[5];
    r->rip = r->rcx;
    r->rflags = r->r11;
    r->cs = FLAT_USER_CS32;             /* what Xen's cstar_enter records */
    r->ss = FLAT_USER_SS32;
    return 1;
}

/* An exit on PV_TRAP_PORT (an exception stub) or PV_SYSCALL_PORT (the landing page).
 * 0 to run on, or -1 with stop filled. */
static int pv_port_exit(struct hv_vcpu *v, struct hv_stop *stop)
{
    struct hv_domain *d = v->dom;
    struct kvm_run *run = v->run;
    uint64_t rip = run->s.regs.regs.rip, sp = run->s.regs.regs.rsp, *frame = NULL, *saved_rax = NULL;
    struct pv_regs r, before, first;
    struct hv_mm_changed changed = { .n = 0 };
    int rc, compat;

    pv_regs_from_run(v, &r);
    first = r;
    in_exit = 1;
    hv_mm_note_changes(&changed);
    if (run->io.port == PV_TRAP_PORT) {
        int vector = (int)((rip - PV_STUBS_VA) / PV_STUB_SIZE), with_error;
        uint32_t error;
        uint64_t stack = PV_VCPU_VA(v->id, PV_STACK_VA), top = PV_VCPU_VA(v->id, PV_STACK_TOP);
        if (rip >= PV_STUBS_VA && vector == 14 && (sp < stack || sp + 7 * 8 > top) &&
            host_compat_syscall(v, sp, &r)) {
            pv_step_entry(v, &r, 0);
            before = r;
            d->counters.exits[HV_EXIT_HYPERCALL]++;
            rc = pv_syscall(v, &r, stop);
            goto out;
        }
        if (rip < PV_STUBS_VA || vector >= 32 || sp < stack ||
            sp + (6 + (uint64_t)pv_has_error_code(vector)) * 8 > top) {
            in_exit = 0;
            hv_mm_note_changes(NULL);
            hv_stop_with(stop, HV_STOP_FAULT, KVM_EXIT_IO, rip,
                         "exit on the trap port outside an exception stub");
            return -1;
        }
        /* the stub's saved rax, then the CPU's frame: [error], rip, cs, rflags, rsp, ss */
        saved_rax = (uint64_t *)(pv_vcpu_stack(v) + (sp - stack));
        r.rax = *saved_rax;
        frame = saved_rax + 1;
        with_error = pv_has_error_code(vector);
        error = with_error ? (uint32_t)frame[0] : 0;
        frame += with_error;
        r.rip = frame[0];
        r.cs = frame[1];
        r.rflags = frame[2];
        r.rsp = frame[3];
        r.ss = frame[4];
        pv_step_entry(v, &r, vector == 1);
        before = r;
        if (vector != 1 && vector != 3 && vector != 4 && (r.cs | 3) != FLAT_RING3_CS64 &&
            pv_compat_code(v, r.cs)) {
            /* a fault of compat code that got there by a far transfer of its own (and ran
             * here until it faulted): the twin runs the instruction again, and a fault
             * of the guest's own comes from there */
            in_exit = 0;
            hv_mm_note_changes(NULL);
            drop_at_next_flush(d, &changed);
            d->counters.exits[HV_EXIT_EXCEPTION]++;
            return twin_enter(v, &r, stop);
        }
        if (vector == 14 && (r.rip == PV_LANDING_VA || r.rip == PV_LANDING32_VA) &&
            run->s.regs.sregs.cr2 == r.rip) {
            /* `syscall` on a host that cannot fetch the landing page from ring 3
             * (KVM-PVM refuses ring 3 in L4 slot 256): the #PF at LSTAR (CSTAR from
             * compat code, whose CS Xen's cstar_enter records) is the syscall */
            d->counters.exits[HV_EXIT_HYPERCALL]++;
            if (r.rip == PV_LANDING32_VA)
                r.cs = FLAT_USER_CS32;
            rc = pv_syscall(v, &r, stop);
        } else if (vector == 1 && v->pv.step.on) {
            d->counters.exits[HV_EXIT_EXCEPTION]++;
            rc = pv_step_trap(v, &r, stop);     /* trapless's single-step (pv_debug.c) */
        } else {
            d->counters.exits[HV_EXIT_EXCEPTION]++;
            if (vector == 1) {
                /* the guest's own TF (or int1): what the CPU's DR6 says goes into the
                 * guest's, as Xen's pv_inject_DB merges it (B0-B3 replaced) */
                struct kvm_debugregs dbg;
                uint32_t bits = ioctl(v->fd, KVM_GET_DEBUGREGS, &dbg) == 0 ? dbg.dr6 & 0xe00f : 0;
                rc = pv_inject_db(v, &r, bits, stop);
            } else {
                rc = pv_exception(v, &r, vector, error, run->s.regs.sregs.cr2, stop);
            }
        }
    } else if ((rip >= PV_LANDING_VA && rip <= PV_LANDING_VA + 2) ||
               (rip >= PV_LANDING32_VA && rip <= PV_LANDING32_VA + 2)) {
        /* CSTAR's landing: `syscall` from compat code, which Xen's cstar_enter records
         * with FLAT_USER_CS32 whatever selector the CPU left */
        if (rip >= PV_LANDING32_VA)
            r.cs = FLAT_USER_CS32;
        pv_step_entry(v, &r, 0);
        before = r;
        d->counters.exits[HV_EXIT_HYPERCALL]++;
        rc = pv_syscall(v, &r, stop);
    } else {
        /* The I/O bitmap opens this port to ring 3 for the landing page; an `out` to
         * it from anywhere else is the #GP Xen would raise for a denied port. */
        r.rip = rip - 2;
        pv_step_entry(v, &r, 0);
        before = r;
        d->counters.exits[HV_EXIT_EXCEPTION]++;
        rc = pv_exception(v, &r, 13, 0, 0, stop);
    }
out:
    /* Xen delivers pending events on every way back to the guest; armed breakpoints
     * make it a single step, unless it goes to compat code, which the twin runs */
    if (rc == 0)
        rc = pv_deliver_events(v, &r, stop);
    compat = rc == 0 && (r.cs | 3) != FLAT_RING3_CS64 && pv_compat_code(v, r.cs);
    if (rc == 0 && !compat)
        rc = pv_step_resume(v, &r, stop);
    in_exit = 0;
    hv_mm_note_changes(NULL);
    if (rc < 0 || compat) {
        drop_at_next_flush(d, &changed);
        if (rc == 0)
            return twin_enter(v, &r, stop);     /* takes the pending cr3 */
        pending_set_cr3 = pending_flush = 0;    /* this thread may run another domain */
        return -1;
    }
    if (frame) {
        *saved_rax = r.rax;
        frame[0] = r.rip;
        frame[1] = r.cs | 3;
        frame[2] = r.rflags;
        frame[3] = r.rsp;
        frame[4] = r.ss | 3;
        /* the common case (a hypercall, a bounce): the stub does the rest */
        if (only_stub_regs_changed(&r, &before) && !pending_set_cr3 && !pending_flush &&
            !v->pv.hw_dirty) {
            if (changed.n)
                rewrite_from_stub(v, &changed);
            return 0;
        }
    }
    /* The landing page's `out` ran natively in ring 3: KVM sees the new rip and drops
     * the instruction's completion, so sync regs alone resume the guest; a switch
     * between guest kernel and user mode (cr3 and the GS bases) goes with them as
     * sync sregs, applied by the same KVM_RUN. Anything else that needs
     * KVM_SET_SREGS (a flush, a %gs selector, control state) completes the `out`
     * first. */
    if (!frame && !pending_flush && r.gs_sel == first.gs_sel && !v->pv.hw_dirty &&
        run->s.regs.sregs.cs.dpl == 3) {
        struct kvm_sregs *sregs = &run->s.regs.sregs;
        if (pending_set_cr3 || r.fs_base != first.fs_base || r.gs_base != first.gs_base) {
            if (pending_set_cr3 && drop_shadows(d) < 0) {
                hv_stop_with(stop, HV_STOP_ERROR, errno, rip, "cannot drop KVM's shadow "
                             "page tables: %s", strerror(errno));
                return -1;
            }
            if (pending_set_cr3)
                sregs->cr3 = pending_cr3;
            sregs->fs.base = r.fs_base;
            sregs->gs.base = r.gs_base;
            pending_set_cr3 = 0;
            run->kvm_dirty_regs |= KVM_SYNC_X86_SREGS;
        }
        memcpy(&run->s.regs.regs, &r, 18 * sizeof(uint64_t));
        run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
        if (changed.n) {
            rewrite_from_ring3(v, &changed, &r, sregs);
            run->kvm_dirty_regs |= KVM_SYNC_X86_SREGS;
        }
        return 0;
    }
    if (complete_io(v) < 0 || apply_pending(v, 1) < 0) {
        hv_stop_with(stop, HV_STOP_ERROR, errno, rip, "cannot complete a PV exit: %s",
                     strerror(errno));
        return -1;
    }
    if (pv_regs_to_run(v, &r, frame != NULL, &first) < 0) {
        hv_stop_with(stop, HV_STOP_ERROR, errno, rip, "cannot set the vCPU's registers: %s",
                     strerror(errno));
        return -1;
    }
    if (changed.n && frame) {
        rewrite_from_stub(v, &changed);
    } else if (changed.n && rewrite_from_ring3_now(v, &changed, &r) < 0) {
        hv_stop_with(stop, HV_STOP_ERROR, errno, rip, "cannot send the vCPU through the "
                     "rewrite routine: %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* An exception KVM has taken but not yet delivered through the IDT (an exit came
 * between the two): it belongs to the instruction at rip, and its stub exits as soon
 * as the guest runs, delivering events then. */
static int exception_in_flight(struct hv_vcpu *v)
{
    struct kvm_vcpu_events ev;
    if (hv_kvm_vcpu_events(v, &ev) < 0)
        return 1;                       /* unknown: let the next exit deliver */
    return ev.exception.injected || ev.exception.pending;
}

/* An event upcall due while the guest runs its own code (not inside a stub or the
 * landing page, which exit at once and deliver it themselves). Not while an exception
 * is in flight: the bounce would move rip to the callback, and KVM would then deliver
 * that exception with the callback's address as the faulting one. */
static int pv_events(struct hv_vcpu *v, struct hv_stop *stop)
{
    struct pv_regs r, first;

    if (!v->cr3_valid || !pv_upcall_due(v) || pv_in_area(v->run->s.regs.regs.rip) ||
        exception_in_flight(v))
        return 0;
    /* The last exit's fast path (pv_port_exit) may have left a mode switch, its cr3 and
     * GS bases, in sync sregs for the next KVM_RUN. KVM takes them first: otherwise a
     * bounce from the user mode the guest just returned to would read the old (kernel)
     * state back with KVM_GET_SREGS, see nothing to switch, and KVM_RUN would then load
     * the user L4 and GS base under the kernel's callback. */
    if ((v->run->kvm_dirty_regs & KVM_SYNC_X86_SREGS) && complete_io(v) < 0)
        return hv_stop_with(stop, HV_STOP_ERROR, errno, v->run->s.regs.regs.rip,
                            "cannot complete a PV exit: %s", strerror(errno)), -1;
    pv_regs_from_run(v, &r);
    pv_step_entry(v, &r, 0);
    first = r;
    if (pv_deliver_events(v, &r, stop) < 0)
        return -1;
    if ((r.cs | 3) != FLAT_RING3_CS64 && pv_compat_code(v, r.cs))
        return twin_enter(v, &r, stop);
    if (pv_step_resume(v, &r, stop) < 0)
        return -1;
    if (pv_regs_to_run(v, &r, 0, &first) < 0) {
        hv_stop_with(stop, HV_STOP_ERROR, errno, r.rip, "cannot set the vCPU's registers: %s",
                     strerror(errno));
        return -1;
    }
    return 0;
}

/* Inject the next vector if the vCPU can take it now; otherwise ask KVM for an exit
 * as soon as it can (interrupt window). -1: KVM_INTERRUPT failed; -2: stop is filled. */
static int deliver_interrupt(struct hv_vcpu *v, struct hv_stop *stop)
{
    struct kvm_run *run = v->run;
    int is_upcall, vector = hv_next_vector(v, &is_upcall);

    if (vector < 0) {
        run->request_interrupt_window = 0;
        return 0;
    }
    if (run->ready_for_interrupt_injection && run->if_flag) {
        struct kvm_interrupt irq = { .irq = (uint32_t)vector };
        if (pvh_tss_trapped(v) && run->s.regs.sregs.cs.dpl == 3) {
            char why[160] = "";
            if (hv_kvm_deliver_interrupt(v, (unsigned)vector, why, sizeof(why)) < 0) {
                hv_stop_with(stop, HV_STOP_FAULT, KVM_EXIT_IRQ_WINDOW_OPEN, run->s.regs.regs.rip,
                             "interrupt %d in ring 3: %s", vector, why);
                return -2;
            }
            hv_vector_taken(v, vector, is_upcall);
            run->request_interrupt_window = 0;
            return 0;
        }
        if (ioctl(v->fd, KVM_INTERRUPT, &irq) < 0)
            return -1;
        injected_vector = vector;
        hv_vector_taken(v, vector, is_upcall);
        run->request_interrupt_window = 0;
        return 0;
    }
    run->request_interrupt_window = 1;
    return 0;
}

/* Another vCPU changed page tables or types (hv_vcpu_flush_others): an exit's I/O may
 * still wait for its completion, which KVM_SET_SREGS must not overtake. */
static int flush_before_entry(struct hv_vcpu *v)
{
    return complete_io(v) < 0 ? -1 : apply_sregs(v, 0, 0, 1);
}

/* VCPUOP_up: the context VCPUOP_initialise gave the vCPU, before its first entry. */
static int load_context(struct hv_vcpu *v, struct hv_stop *stop)
{
    struct pv_regs r, old;
    char err[128];

    if (hv_vcpu_load_context(v, &r, err, sizeof(err)) < 0)
        return hv_stop_with(stop, HV_STOP_ERROR, 0, v->init_regs.rip, "%s", err), -1;
    if ((r.cs | 3) != FLAT_RING3_CS64 && pv_compat_code(v, r.cs)) {
        /* VCPUOP_initialise in compat code: a KVM_RUN that enters nothing fills sync
         * regs with the vCPU's state first (the twin starts from them) */
        if (complete_io(v) < 0)
            return hv_stop_with(stop, HV_STOP_ERROR, errno, r.rip, "cannot read vCPU %d's "
                                "state: %s", v->id, strerror(errno)), -1;
        return twin_enter(v, &r, stop);
    }
    memset(&old, 0, sizeof(old));
    old.gs_sel = ~0ULL;                 /* load every segment register the model keeps */
    memcpy(&v->run->s.regs.regs, &r, 18 * sizeof(uint64_t));
    v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
    if (pv_load_sregs(v, &r, &old, 0) < 0)
        return hv_stop_with(stop, HV_STOP_ERROR, errno, r.rip, "cannot set vCPU %d's "
                            "segments: %s", v->id, strerror(errno)), -1;
    return 0;
}

static int kvm_run_loop(struct hv_vcpu *v, struct hv_stop *stop)
{
    struct hv_domain *d = v->dom;
    struct kvm_run *run = v->run;
    struct hv_counters *c = &d->counters;

    for (;;) {
        int irq_rc;
        if (v->on_twin) {
            /* compat code: the twin runs it until the vCPU is in 64-bit code again */
            int rc = hv_twin_run(v, stop);
            if (rc != HV_TWIN_BACK)
                return rc;
            if (twin_leave(v, stop) < 0)
                return stop->reason;
        }
        if (__atomic_load_n(&d->shutting_down, __ATOMIC_ACQUIRE))
            return hv_stop_with(stop, HV_STOP_SHUTDOWN, d->shutdown_reason, run->s.regs.regs.rip,
                             "shutdown");
        if (__atomic_exchange_n(&v->kicked, 0, __ATOMIC_SEQ_CST))
            return hv_stop_with(stop, HV_STOP_KICKED, 0, run->s.regs.regs.rip, "stopped by the toolstack");
        if (__atomic_load_n(&v->paused, __ATOMIC_ACQUIRE))
            hv_vcpu_park(v, HV_WAIT_UNPAUSE, 0);
        if (hv_vcpu_must_park(v))
            return HV_STOP_PARKED;      /* the `in` of a blocking hypercall is completed
                                         * by the next KVM_RUN, from whichever worker */
        if (v->context_pending && load_context(v, stop) < 0)
            return stop->reason;
        if (d->pv_model == HV_PV_XEN) {
            if (pv_events(v, stop) < 0)
                return stop->reason;
        } else if ((irq_rc = deliver_interrupt(v, stop)) < 0) {
            if (irq_rc == -2)
                return stop->reason;
            return hv_stop_with(stop, HV_STOP_ERROR, errno, run->s.regs.regs.rip,
                             "KVM_INTERRUPT failed: %s", strerror(errno));
        }
        int entry = hv_vcpu_before_entry(v, flush_before_entry);
        if (entry > 0)
            return HV_STOP_PARKED;
        if (entry < 0)
            return hv_stop_with(stop, HV_STOP_ERROR, errno, run->s.regs.regs.rip,
                                "cannot flush the vCPU's TLB: %s", strerror(errno));

        int rc = ioctl(v->fd, KVM_RUN, 0), just_injected = injected_vector;
        __atomic_store_n(&v->in_guest, 0, __ATOMIC_SEQ_CST);
        injected_vector = -1;
        /* Xen's model reads cr3 from sync regs; the ring-0 one asks when it needs it */
        v->cr3 = run->s.regs.sregs.cr3;
        v->cr3_valid = d->pv_model == HV_PV_XEN;
        if (rc < 0) {
            if (errno == EINTR || errno == EAGAIN) {
                struct kvm_vcpu_events ev;
                c->exits[HV_EXIT_INTR]++;
                /* stopped before the entry that delivers it: still KVM's to deliver */
                if (just_injected >= 0 && hv_kvm_vcpu_events(v, &ev) == 0 &&
                    ev.interrupt.injected)
                    injected_vector = just_injected;
                __atomic_store_n(&run->immediate_exit, 0, __ATOMIC_SEQ_CST);
                continue;
            }
            return hv_stop_with(stop, HV_STOP_ERROR, errno, run->s.regs.regs.rip,
                             "KVM_RUN failed: %s", strerror(errno));
        }
        uint64_t rip = run->s.regs.regs.rip;
        if (d->guest_type == HV_GUEST_PVH) {
            char why[160] = "";
            v->cr3_valid = 1;           /* synced with the other sregs */
            if (pvh_track_tss(v, why, sizeof(why)) < 0)
                return hv_stop_with(stop, HV_STOP_ERROR, errno, rip, "%s", why);
        }

        switch (run->exit_reason) {
        case KVM_EXIT_IO:
            if (d->pv_model == HV_PV_XEN &&
                (run->io.port == PV_TRAP_PORT || run->io.port == PV_SYSCALL_PORT)) {
                if (pv_port_exit(v, stop) < 0)
                    return stop->reason;
                break;
            }
            in_exit = 1;
            port_io(v, run);
            in_exit = 0;
            if (apply_pending(v, 0) < 0)
                return hv_stop_with(stop, HV_STOP_ERROR, errno, rip,
                                 "cannot switch or flush the vCPU's page tables: %s",
                                 strerror(errno));
            break;
        case KVM_EXIT_HLT:
            c->exits[HV_EXIT_HLT]++;
            if (!(run->s.regs.regs.rflags & (1ULL << 9)))
                return hv_stop_with(stop, HV_STOP_FAULT, KVM_EXIT_HLT, rip,
                                 "hlt with interrupts disabled: nothing can wake the vCPU");
            /* Idle until an interrupt can be delivered (or the toolstack stops us). */
            c->blocks++;
            hv_vcpu_park(v, HV_WAIT_INTERRUPT, 0);
            break;
        case KVM_EXIT_IRQ_WINDOW_OPEN:
            c->exits[HV_EXIT_IRQ_WINDOW]++;
            break;
        case KVM_EXIT_MMIO:
            c->exits[HV_EXIT_MMIO]++;
            if (pvh_hole_mmio(v, run))
                break;
            if (hv_devices_mmio(v, run->mmio.phys_addr, (int)run->mmio.len, run->mmio.is_write,
                                run->mmio.data))
                break;
            if (hv_pvh_mmio(v, run->mmio.phys_addr, (int)run->mmio.len, run->mmio.is_write,
                            run->mmio.data))
                break;
            if (run->mmio.is_write && run->mmio.phys_addr >= d->pt_pool_start &&
                run->mmio.phys_addr < d->pt_pool_end)
                return hv_stop_with(stop, HV_STOP_FAULT, KVM_EXIT_MMIO, rip,
                                 "direct write to page-table frame at guest-physical %#llx "
                                 "(page tables change only through mmu_update)",
                                 (unsigned long long)run->mmio.phys_addr);
            return hv_stop_with(stop, HV_STOP_FAULT, KVM_EXIT_MMIO, rip,
                             "%s of guest-physical %#llx, outside guest memory",
                             run->mmio.is_write ? "write" : "read",
                             (unsigned long long)run->mmio.phys_addr);
        case KVM_EXIT_X86_WRMSR:        /* the PVH hypercall-page MSR (the filter's only) */
            c->exits[HV_EXIT_PRIV_INSN]++;
            run->msr.error = hv_pvh_wrmsr(v, run->msr.index, run->msr.data) < 0;
            break;
        case KVM_EXIT_SHUTDOWN:
            if (pvh_tss_trapped(v)) {
                /* an event KVM could not deliver without the TSS (above) */
                char why[160] = "";
                int r = just_injected >= 0
                        ? hv_kvm_deliver_interrupt(v, (unsigned)just_injected, why, sizeof(why))
                        : hv_kvm_deliver_stopped_event(v, why, sizeof(why));
                if (r == 0) {
                    c->exits[HV_EXIT_EXCEPTION]++;
                    break;
                }
                if (r == 2)
                    break;              /* ring-3 in/out, done and counted as port I/O */
                if (r == 1) {
                    /* ring-3 port I/O: the TSS's I/O bitmap is KVM's to read. It gets
                     * the pages back for this instruction; the next exit (the port's
                     * own when the bitmap lets it through) takes them again. */
                    c->exits[HV_EXIT_OTHER]++;
                    v->tss_trap[0] = v->tss_trap[1] = HV_NO_PAGE;
                    v->tss_seen_base = ~0ULL;
                    if (layout_ram_slots(d, why, sizeof(why)) < 0)
                        return hv_stop_with(stop, HV_STOP_ERROR, errno, rip, "%s", why);
                    break;
                }
                if (why[0]) {
                    c->exits[HV_EXIT_SHUTDOWN]++;
                    return hv_stop_with(stop, HV_STOP_FAULT, KVM_EXIT_SHUTDOWN, rip,
                                        "triple fault: %s", why);
                }
                /* Not an event from ring 3: KVM read something else on the TSS's pages
                 * outside its emulator (a GDT or IDT beside the TSS). Give them back
                 * until TR or cr3 changes, and run the instruction again: ring-3 int n
                 * is then this host's #UD again, and a real triple fault comes back. */
                c->exits[HV_EXIT_OTHER]++;
                v->tss_trap[0] = v->tss_trap[1] = HV_NO_PAGE;
                if (layout_ram_slots(d, why, sizeof(why)) < 0)
                    return hv_stop_with(stop, HV_STOP_ERROR, errno, rip, "%s", why);
                break;
            }
            c->exits[HV_EXIT_SHUTDOWN]++;
            return hv_stop_with(stop, HV_STOP_FAULT, KVM_EXIT_SHUTDOWN, rip, "triple fault");
        case KVM_EXIT_FAIL_ENTRY:
            c->exits[HV_EXIT_FAIL_ENTRY]++;
            return hv_stop_with(stop, HV_STOP_FAULT, KVM_EXIT_FAIL_ENTRY, rip,
                             "VM entry failed (hardware reason %#llx)",
                             (unsigned long long)run->fail_entry.hardware_entry_failure_reason);
        case KVM_EXIT_INTR:
            c->exits[HV_EXIT_INTR]++;
            break;
        case KVM_EXIT_INTERNAL_ERROR: {
            /* this host's emulator gives up on a few ring-0 instructions: kvm_emul.c */
            char why[160] = "";
            c->exits[HV_EXIT_OTHER]++;
            if (run->internal.suberror == KVM_INTERNAL_ERROR_EMULATION &&
                hv_kvm_emulate(v, why, sizeof(why)) == 0)
                break;
            return hv_stop_with(stop, HV_STOP_FAULT, KVM_EXIT_INTERNAL_ERROR, rip,
                             "KVM internal error (suberror %u)%s%s", run->internal.suberror,
                             why[0] ? ": " : "", why);
        }
        default:
            c->exits[HV_EXIT_OTHER]++;
            return hv_stop_with(stop, HV_STOP_FAULT, (int)run->exit_reason, rip,
                             "unhandled exit (exit_reason=%u)", run->exit_reason);
        }
    }
}

const struct hv_engine_impl hv_kvm_engine = {
    .name = "kvm",
    .available = kvm_available,
    .create_vm = kvm_create_vm,
    .destroy_vm = kvm_destroy_vm,
    .vcpu_create = kvm_vcpu_create,
    .vcpu_destroy = kvm_vcpu_destroy,
    .set_boot_state = kvm_set_boot_state,
    .run = kvm_run_loop,
    .guest_atomics = 1,
    .guest_fences = 1,
    /* KVM-PVM runs ring 3 natively under the host's own CR4, FSGSBASE set */
    .cr4_fsgsbase = 0,
};

int hv_kvm_available(char *why, int why_len)
{
    return kvm_available(why, why_len);
}
