/*
 * bt.c - the bt engine: the same guests without KVM, by binary translation on Unicorn
 * (QEMU's TCG).
 *
 * Guest RAM is the domain's own host memory, mapped into Unicorn with uc_mem_map_ptr;
 * the page-table pool is mapped read-only. Every hook is a C function of this file:
 *
 *   - `in`/`out` (the helper TCG calls for port I/O): the hypercall stub's `in` to the
 *     hypercall port runs the hypercall on the spot and hands back the result as the
 *     data read; other ports go to the device models.
 *   - the translator: when TCG has translated a new block (the edge hook), the block is
 *     decoded (bt_decode.c) and every sensitive instruction in it gets a code hook of
 *     its own; the block is dropped and translated again with the hooks in it. From
 *     then on the VMM sees hlt, cli/sti, popf, iretq, mov to a control register, wrmsr,
 *     lgdt/lidt, invlpg ... before the guest executes them, and counts them as traps.
 *   - the MMU: TCG's TLB is filled by our own walk of the guest's page tables
 *     (bt_cpu.c), so a refused access stops the emulator at the faulting instruction
 *     and becomes a precise #PF.
 *   - stores into the read-only page-table pool: handed to the device model
 *     (hv_devices_mmio) as KVM's MMIO exit would be, or a fault.
 *   - exceptions TCG raises: delivered through the guest's IDT by bt_cpu.c.
 *
 * The run loop mirrors kvm.c's: shutdown, kick and pause checks, interrupt delivery
 * (hv_next_vector) when RFLAGS.IF allows, hlt parks the vCPU (hv_vcpu_park), faults reported
 * with hv_stop_with. Timers and other threads stop the emulator with a kick (below).
 */
#include <stdlib.h>
#include <string.h>
#include <sys/prctl.h>
#include <time.h>
#include <x86intrin.h>

#include "bt.h"
#include "grant_table.h"

#define TCG_BUFFER_BYTES (64u << 20)    /* translated code per vCPU; Unicorn's default is 1 GiB */

/* ---- the TSC: guest rdtsc in TCG reads the host TSC; the PV clock needs its rate ---- */

static uint64_t tsc_khz;
static pthread_once_t tsc_once = PTHREAD_ONCE_INIT;

/* A (tsc, ns) pair taken close together: the tightest of a few tries. */
static void tsc_sample(uint64_t *tsc, uint64_t *ns)
{
    uint64_t best = ~0ULL;
    for (int i = 0; i < 8; i++) {
        uint64_t a = __rdtsc(), t = hv_now_ns(), c = __rdtsc();
        if (c - a < best) {
            best = c - a;
            *tsc = a + (c - a) / 2;
            *ns = t;
        }
    }
}

/* The rate against CLOCK_MONOTONIC (system time) over 20 ms, once per process. */
static void calibrate_tsc(void)
{
    uint64_t t0 = 0, n0 = 0, t1 = 0, n1 = 0;
    struct timespec gap = { 0, 20 * 1000 * 1000 };
    tsc_sample(&t0, &n0);
    nanosleep(&gap, NULL);
    tsc_sample(&t1, &n1);
    if (n1 > n0 && t1 > t0)
        tsc_khz = (uint64_t)((double)(t1 - t0) * 1e6 / (double)(n1 - n0));
}

/* ---- the engine's availability ---- */

static int bt_available(char *why, int why_len)
{
    if (!bt_uc_loaded) {
        hv_set_error(why, why_len, "%s", bt_uc_why);
        return 0;
    }
    return 1;
}

int hv_bt_available(char *why, int why_len)
{
    return bt_available(why, why_len);
}

static int bt_create_vm(struct hv_domain *d, char *err, int err_len)
{
    return bt_available(err, err_len) ? 0 : -1;
}

static void bt_destroy_vm(struct hv_domain *d)
{
}

static struct bt_vcpu *bt_of(struct hv_vcpu *v)
{
    return v->engine_priv;
}

/* ---- engine ops ---- */

static int bt_get_cr3(struct hv_vcpu *v, uint64_t *cr3)
{
    *cr3 = bt_cr3(bt_of(v));
    return 0;
}

/* Called from the hypercall hook, mid-block: TCG flushes its TLB and the rest of the
 * stub (cdqe; ret) already runs on the new tables, as after a guest mov to cr3. The
 * same tables again change nothing: TCG's TLB is untagged, so a switch between guest
 * kernel and user mode that share their L4 keeps it rather than walk every page
 * again (Xen with PCID does not flush on such a switch either; a flush the guest
 * asks for is flush_tlb). */
static int bt_set_cr3(struct hv_vcpu *v, uint64_t cr3)
{
    if (bt_cr3(bt_of(v)) == cr3)
        return 0;
    return bt_write_cr3(bt_of(v), cr3);
}

static int bt_flush_tlb(struct hv_vcpu *v)
{
    return bt_uc.ctl(bt_of(v)->uc, UC_CTL_TLB_FLUSH_W) == UC_ERR_OK ? 0 : -1;
}

/* ---- kicks ----
 *
 * Another thread never calls uc_emu_stop itself: a stop from outside lands at a TB
 * boundary, and when that boundary is a chained jump Unicorn leaves the PC of an earlier
 * block in RIP (it skips the PC sync once a stop is requested; unicorn-engine/unicorn
 * issue 1355), so the guest would run instructions twice after an interrupt there; and
 * until the stop lands, Unicorn skips our code hooks (TCG would run a vmcall itself).
 * With trapless's patched libunicorn (third_party/unicorn) the kick is uc_kick, QEMU's
 * own cpu_exit: every block tests a flag at its start, and the outermost emu_start
 * returns there with RIP exact; a run nested in a hook (bt_cpu.c's ring changes) runs to
 * its end first. With a stock one the kick sets stop_asked, and the block hook
 * (on_block), which Unicorn runs at the start of every block with the PC written back,
 * stops the emulator exactly there: a call per block, some 150 million in a Linux boot.
 * One thread for the whole process repeats an unanswered kick with a growing pause
 * (0.1, 0.8, 6.4, 51 ms) until the vCPU leaves the emulator. Lock order: a vCPU's
 * kick_lock, then kq_lock.
 */

/* From another thread holding b->kick_lock, or from a hook of the vCPU's own thread:
 * stop at the start of the next block. Outside the main run (a ring change run from the
 * run loop) only stop_asked is set: the run loop looks at everything before it enters. */
static void ask_stop(struct bt_vcpu *b)
{
    __atomic_store_n(&b->stop_asked, 1, __ATOMIC_RELEASE);
    if (bt_uc.kick && b->in_emu)
        bt_uc.kick(b->uc);
}

/* Blocks a vCPU runs before it lets another vCPU of its domain that waits for the guest
 * lock have its turn (vcpu.c): some milliseconds of guest code. */
#define BT_SLICE_BLOCKS 20000

static void on_block(uc_engine *uc, uint64_t address, uint32_t size, void *user)
{
    struct bt_vcpu *b = user;
    /* the VMM's own ring-change code (bt_cpu.c) runs to its end: the kick waits */
    if (b->tramp_active)
        return;
    if (__atomic_load_n(&b->stop_asked, __ATOMIC_ACQUIRE)) {
        __atomic_store_n(&b->stop_asked, 0, __ATOMIC_RELAXED);
        bt_uc.emu_stop(uc);
    } else if (++b->slice_blocks >= BT_SLICE_BLOCKS) {
        b->slice_blocks = 0;
        if (__atomic_load_n(&b->v->dom->guest_waiters, __ATOMIC_RELAXED)) {
            b->slice_over = 1;
            bt_uc.emu_stop(uc);
        }
    }
}

static pthread_mutex_t kq_lock = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t kq_cond;          /* the kicker: a new entry */
static pthread_cond_t kq_done;          /* bt_vcpu_destroy: the kicker let a vCPU go */
static struct bt_vcpu *kq_head;
static pthread_once_t kq_once = PTHREAD_ONCE_INIT;
static int kq_running;

#define KICK_FIRST_PAUSE_NS (100 * 1000ULL)
#define KICK_TRIES 4

/* Caller holds kq_lock. */
static void kq_unlink(struct bt_vcpu *b)
{
    for (struct bt_vcpu **p = &kq_head; *p; p = &(*p)->kq_next)
        if (*p == b) {
            *p = b->kq_next;
            break;
        }
    b->kq_next = NULL;
    b->kq_queued = 0;
}

static void *kicker_main(void *unused)
{
    prctl(PR_SET_NAME, "bt kicker");    /* what top, perf and /proc/PID/task call it */
    pthread_mutex_lock(&kq_lock);
    for (;;) {
        uint64_t now = hv_now_ns(), next = ~0ULL;
        struct bt_vcpu *due = NULL;
        for (struct bt_vcpu *b = kq_head; b; b = b->kq_next) {
            if (b->kq_due_ns <= now && !due)
                due = b;
            else if (b->kq_due_ns < next)
                next = b->kq_due_ns;
        }
        if (!due) {
            if (next == ~0ULL) {
                pthread_cond_wait(&kq_cond, &kq_lock);
            } else {
                struct timespec ts = { .tv_sec = (time_t)(next / 1000000000ULL),
                                       .tv_nsec = (long)(next % 1000000000ULL) };
                pthread_cond_timedwait(&kq_cond, &kq_lock, &ts);
            }
            continue;
        }
        uint64_t gen = due->kq_gen;
        int unanswered;
        due->kq_busy = 1;
        pthread_mutex_unlock(&kq_lock);
        pthread_mutex_lock(&due->kick_lock);
        unanswered = due->kick_pending && due->in_emu && due->emu_gen == gen;
        if (unanswered)
            ask_stop(due);
        pthread_mutex_unlock(&due->kick_lock);
        pthread_mutex_lock(&kq_lock);
        due->kq_busy = 0;
        if (due->kq_gen == gen && due->kq_queued) {     /* not kicked afresh meanwhile */
            if (!unanswered || ++due->kq_tries >= KICK_TRIES)
                kq_unlink(due);                         /* answered, or given up on */
            else
                due->kq_due_ns = hv_now_ns() + (KICK_FIRST_PAUSE_NS << (3 * due->kq_tries));
        }
        pthread_cond_broadcast(&kq_done);
    }
    return NULL;
}

static void kq_start(void)
{
    pthread_condattr_t attr;
    pthread_t t;
    pthread_condattr_init(&attr);
    pthread_condattr_setclock(&attr, CLOCK_MONOTONIC);
    pthread_cond_init(&kq_cond, &attr);
    pthread_condattr_destroy(&attr);
    pthread_cond_init(&kq_done, NULL);
    if (pthread_create(&t, NULL, kicker_main, NULL) == 0) {
        pthread_detach(t);      /* it serves the process until the process ends */
        kq_running = 1;
    }
}

/* Caller holds b->kick_lock: watch this kick until the vCPU answers it. */
static void kq_watch(struct bt_vcpu *b)
{
    pthread_mutex_lock(&kq_lock);
    if (kq_running) {
        b->kq_gen = b->emu_gen;
        b->kq_tries = 0;
        b->kq_due_ns = hv_now_ns() + KICK_FIRST_PAUSE_NS;
        if (!b->kq_queued) {
            b->kq_queued = 1;
            b->kq_next = kq_head;
            kq_head = b;
        }
        pthread_cond_signal(&kq_cond);
    }
    pthread_mutex_unlock(&kq_lock);
}

/* The vCPU goes away: out of the queue, and out of the kicker's hands. */
static void kq_forget(struct bt_vcpu *b)
{
    pthread_mutex_lock(&kq_lock);
    if (b->kq_queued)
        kq_unlink(b);
    while (b->kq_busy)
        pthread_cond_wait(&kq_done, &kq_lock);
    pthread_mutex_unlock(&kq_lock);
}

/* From any thread: make the vCPU leave the emulator soon. */
static void bt_kick(struct hv_vcpu *v)
{
    struct bt_vcpu *b = bt_of(v);
    if (!b)
        return;                 /* being torn down */
    pthread_mutex_lock(&b->kick_lock);
    b->kick_pending = 1;
    if (b->in_emu) {
        ask_stop(b);
        kq_watch(b);            /* the kicker makes sure the stop is not lost */
    }
    pthread_mutex_unlock(&b->kick_lock);
}

static int bt_get_mode(struct hv_vcpu *v, struct hv_cpu_mode *m)
{
    struct bt_vcpu *b = bt_of(v);
    uc_x86_msr efer = { .rid = 0xc0000080 };
    bt_uc.reg_read(b->uc, UC_X86_REG_MSR, &efer);
    m->cr0 = bt_reg(b, UC_X86_REG_CR0);
    m->cr4 = bt_reg(b, UC_X86_REG_CR4);
    m->efer = efer.value;
    m->cs_long = !bt_code32(b);
    m->cpl = (int)(bt_reg(b, UC_X86_REG_CS) & 3);
    return 0;
}

/* TCG's CPU: the features it can run (AVX and others the host has may be missing). */
static void bt_cpuid(struct hv_vcpu *v, uint32_t leaf, uint32_t subleaf, uint32_t out[4])
{
    bt_guest_cpuid(bt_of(v), leaf, subleaf, out);
}

static int bt_engine_tlb_gpa(struct hv_vcpu *v, uint64_t gva, int write, uint64_t *gpa)
{
    return bt_tlb_gpa(bt_of(v), gva, write ? UC_MEM_WRITE : UC_MEM_READ, gpa);
}

const struct hv_engine_ops bt_vcpu_ops = {
    .cpuid = bt_cpuid,
    .get_cr3 = bt_get_cr3,
    .kick = bt_kick,
    .set_cr3 = bt_set_cr3,
    .flush_tlb = bt_flush_tlb,
    .get_mode = bt_get_mode,
    .tlb_gpa = bt_engine_tlb_gpa,
};

/* ---- sensitive instructions: the sites the translator found ---- */

static unsigned site_bucket(uint64_t addr)
{
    return (unsigned)((addr * 0x9e3779b97f4a7c15ULL) >> 54) & (BT_SITE_BUCKETS - 1);
}

static struct bt_site *site_at(struct bt_vcpu *b, uint64_t addr)
{
    for (struct bt_site *s = b->sites[site_bucket(addr)]; s; s = s->next)
        if (s->addr == addr)
            return s;
    return NULL;
}

static int interrupts_on(struct bt_vcpu *b)
{
    return (bt_reg(b, UC_X86_REG_RFLAGS) & RFLAGS_IF) != 0;
}

/* An interrupt is waiting and the guest can take it now. */
static int deliverable(struct bt_vcpu *b)
{
    if (b->v->dom->pv_model == HV_PV_XEN)
        return pv_upcall_due(b->v);
    return hv_interrupt_due(b->v, NULL) && interrupts_on(b);
}

/* Instructions only a ring-3 guest kernel (Xen's PV model) must not run itself. */
static int ring3_only(int kind)
{
    return kind == BT_PORT_IO || kind == BT_READ_CRDR || kind == BT_WRSEGBASE ||
           kind == BT_PRIV_RING3 || kind == BT_LOAD_SS ||
           kind == BT_STORE_SS || kind == BT_FAR_RET || kind == BT_FAR_JMP;
}

/* mov cr4, reg: the register number, or -1 for any other instruction */
static int insn_cr4_write(const struct bt_insn *in)
{
    if (in->map != 1 || in->opcode != 0x22 || ((in->modrm >> 3) & 7) != 4 || (in->rex & 4))
        return -1;
    return (in->modrm & 7) | ((in->rex & 1) << 3);
}

/* mov cr4, reg at a site: the register number, or -1 for any other instruction */
static int cr4_write(const struct bt_site *s)
{
    struct bt_insn in;
    if (bt_decode(s->bytes, s->len, &in) < 0)
        return -1;
    return insn_cr4_write(&in);
}

/* Whether a PVH guest's sensitive instruction needs a site. Its cli, lgdt, invlpg, mov
 * to cr3, wbinvd ... are TCG's to run, as they run in place on kvm (no exit): a site
 * would only count them, and every code hook costs: Unicorn walks the list of all of
 * them for each instruction it translates and each site it runs. What the VMM decides
 * keeps its site: hlt, vmcall, rdmsr/wrmsr (the platform's MSRs), mov to cr4 (the
 * CPUID's bits), sti/popf/iret (a waiting interrupt), int n and icebp (their
 * delivery). */
static int pvh_needs_site(const struct bt_insn *in)
{
    switch (in->kind) {
    case BT_CLI: case BT_MOV_DR: case BT_LGDT: case BT_LIDT: case BT_LLDT: case BT_LTR:
    case BT_INVLPG: case BT_CLTS: case BT_CACHE:
        return 0;
    case BT_MOV_CR:
        return insn_cr4_write(in) >= 0;
    default:
        return 1;
    }
}

/* The CR4 bits a PVH guest may set: Xen's hvm_cr4_guest_valid_bits(), from the CPUID
 * the guest sees (no VMXE: no nested virtualisation). */
static uint64_t cr4_valid_bits(struct bt_vcpu *b)
{
    uint32_t l1[4], l7[4];
    uint64_t valid = 1ULL << 8;                                 /* PCE */
    bt_guest_cpuid(b, 1, 0, l1);
    bt_guest_cpuid(b, 7, 0, l7);
    const struct { uint32_t reg, bit; uint64_t cr4; } map[] = {
        { 3, 1, 3ULL << 0 },            /* VME: VME, PVI */
        { 3, 4, 1ULL << 2 },            /* TSC: TSD */
        { 3, 2, 1ULL << 3 },            /* DE */
        { 3, 3, 1ULL << 4 },            /* PSE */
        { 3, 6, 1ULL << 5 },            /* PAE */
        { 3, 7, 1ULL << 6 },            /* MCE */
        { 3, 13, 1ULL << 7 },           /* PGE */
        { 3, 24, 1ULL << 9 },           /* FXSR: OSFXSR */
        { 3, 25, 1ULL << 10 },          /* SSE: OSXMMEXCPT */
        { 2, 17, 1ULL << 17 },          /* PCID: PCIDE */
        { 2, 26, 1ULL << 18 },          /* XSAVE: OSXSAVE */
    }, map7[] = {
        { 2, 2, 1ULL << 11 },           /* UMIP */
        { 2, 16, 1ULL << 12 },          /* LA57 */
        { 1, 0, 1ULL << 16 },           /* FSGSBASE */
        { 1, 7, 1ULL << 20 },           /* SMEP */
        { 1, 20, 1ULL << 21 },          /* SMAP */
        { 2, 3, 1ULL << 22 },           /* PKU: PKE */
        { 2, 31, 1ULL << 24 },          /* PKS */
    };
    for (size_t i = 0; i < sizeof(map) / sizeof(map[0]); i++)
        if ((l1[map[i].reg] >> map[i].bit) & 1)
            valid |= map[i].cr4;
    for (size_t i = 0; i < sizeof(map7) / sizeof(map7[0]); i++)
        if ((l7[map7[i].reg] >> map7[i].bit) & 1)
            valid |= map7[i].cr4;
    return valid;
}

/* The code hook of one site: runs just before the guest would execute it. */
/* Whether the bytes at addr are still the site's, read where the guest fetches them
 * (TCG's TLB, if it holds them, as it does for the block running; else a walk). now:
 * room for them. */
static int same_code(struct bt_vcpu *b, uint64_t addr, const struct bt_site *s, uint8_t *now)
{
    uint64_t gpa;

    if ((addr & (HV_PAGE_SIZE - 1)) + s->len <= HV_PAGE_SIZE &&
        bt_tlb_gpa(b, addr, UC_MEM_FETCH, &gpa) == 0 && hv_gpa_valid(b->v->dom, gpa, s->len))
        return memcmp(b->v->dom->ram + gpa, s->bytes, s->len) == 0;
    return bt_read_virt(b, addr, now, s->len) == 0 && memcmp(now, s->bytes, s->len) == 0;
}

static void on_site(uc_engine *uc, uint64_t addr, uint32_t size, void *user)
{
    struct bt_site *s = user;
    struct bt_vcpu *b = s->b;
    struct hv_counters *c = &b->v->dom->counters;
    uint8_t now[15];

    if (b->tramp_active)
        return;
    if (b->skip_once == s) {
        b->skip_once = NULL;    /* the VMM could not emulate it: TCG runs it as it is */
        return;
    }
    /* The hook is on an address: make sure the same instruction is still there. */
    if (!same_code(b, addr, s, now)) {
        struct bt_insn in;
        uint8_t code[15];
        int avail = 15;
        while (avail > 0 && bt_read_virt(b, addr, code, avail) < 0)
            avail--;
        if (avail == 0 || bt_decode_mode(code, avail, &in, bt_code32(b)) < 0) {
            s->kind = BT_PLAIN;
            return;
        }
        s->kind = ring3_only(in.kind) && b->v->dom->pv_model != HV_PV_XEN ? BT_PLAIN : in.kind;
        s->len = in.len;
        memcpy(s->bytes, code, in.len);
    }
    if (s->kind == BT_INT_N) {
        if (b->v->dom->pv_model == HV_PV_XEN && bt_pv_int_at_site(b, s))
            return;
        b->soft_int_end = addr + s->len;
        b->soft_int_len = s->len;
        return;
    }
    if (s->kind == BT_ICEBP) {
        if (b->v->dom->pv_model == HV_PV_XEN)
            return;             /* TCG's #UD, as before */
        b->stopped_at = s;      /* the VMM raises its #DB */
        bt_uc.emu_stop(uc);
        return;
    }
    if (s->kind != BT_PLAIN && b->v->dom->pv_model == HV_PV_XEN) {
        b->stopped_at = s;      /* ring 3: the PV model decides (bt_pv_site) */
        bt_uc.emu_stop(uc);
        return;
    }
    /* In ring 3 TCG runs them as the CPU would there (a #GP for the privileged ones, a
     * popf that leaves IF alone); only a hypercall is the VMM's (Xen refuses it). */
    if ((bt_reg(b, UC_X86_REG_CS) & 3) == 3 && s->kind != BT_VMCALL)
        return;
    switch (s->kind) {
    case BT_PLAIN:
        return;
    case BT_HLT:
        b->stopped_at = s;      /* the VMM idles the vCPU instead */
        bt_uc.emu_stop(uc);
        return;
    case BT_VMCALL:
        /* a PVH guest's hypercall; elsewhere TCG raises #UD, as a CPU without VMX */
        if (b->v->dom->guest_type != HV_GUEST_PVH)
            return;
        b->stopped_at = s;
        bt_uc.emu_stop(uc);
        return;
    case BT_WRMSR: case BT_RDMSR:
        /* the PVH platform's MSRs (the hypercall page, the APIC's) and the ones this
         * CPU model answers (bt_platform.c) are the VMM's; TCG does the others */
        c->exits[HV_EXIT_PRIV_INSN]++;
        if (b->v->dom->guest_type == HV_GUEST_PVH &&
            (hv_pvh_msr_owned(b->v, (uint32_t)bt_reg(b, UC_X86_REG_RCX)) ||
             bt_platform_msr(b, (uint32_t)bt_reg(b, UC_X86_REG_RCX)))) {
            b->stopped_at = s;
            bt_uc.emu_stop(uc);
        }
        return;
    case BT_MOV_CR:
        /* a PVH guest's mov to CR4: the VMM checks the bits against its CPUID first */
        c->exits[HV_EXIT_PRIV_INSN]++;
        if (b->v->dom->guest_type == HV_GUEST_PVH && cr4_write(s) >= 0) {
            b->stopped_at = s;
            bt_uc.emu_stop(uc);
        }
        return;
    case BT_STI: case BT_POPF: case BT_IRET:
        /* These may turn interrupts on: with one waiting, the VMM executes the
         * instruction itself and delivers it (KVM's interrupt-window exit). */
        if (hv_interrupt_due(b->v, NULL)) {
            c->exits[HV_EXIT_IRQ_WINDOW]++;
            b->stopped_at = s;
            bt_uc.emu_stop(uc);
            return;
        }
        c->exits[HV_EXIT_PRIV_INSN]++;
        return;
    default:
        /* cli, mov to a control register, wrmsr, lidt, invlpg ...: TCG's helpers do
         * what our VMM would (flush the TLB, load the IDT, ...); we count the trap. */
        c->exits[HV_EXIT_PRIV_INSN]++;
        return;
    }
}

static int add_site(struct bt_vcpu *b, uint64_t addr, const struct bt_insn *in, const uint8_t *bytes)
{
    struct bt_site *s = calloc(1, sizeof(*s));
    uc_hook hh;
    unsigned k = site_bucket(addr);
    if (!s)
        return -1;
    s->b = b;
    s->addr = addr;
    s->kind = in->kind;
    s->len = in->len;
    memcpy(s->bytes, bytes, in->len);
    if (bt_uc.hook_add(b->uc, &hh, UC_HOOK_CODE, (void *)on_site, s, addr, addr) != UC_ERR_OK) {
        free(s);
        return -1;
    }
    s->next = b->sites[k];
    b->sites[k] = s;
    b->nr_sites++;
    return 0;
}

/* int3, and `int n` from 32 up, without prefixes, in 64-bit code: TCG raises them
 * and the interrupt hook (on_interrupt) knows each from its vector alone, and its
 * length, so no site is needed to bounce them. The others (into, int 0-31, which the
 * hook would take for the exception, prefixed forms) keep theirs. */
static int interrupt_tells_all(const uint8_t *bytes, int len)
{
    return (len == 1 && bytes[0] == 0xcc) || (len == 2 && bytes[0] == 0xcd && bytes[1] >= 32);
}

/* Decode [pc, pc + size) and hook each sensitive instruction not hooked yet; returns
 * how many were added. Port I/O is left to the port hooks. */
static int scan(struct bt_vcpu *b, uint64_t pc, uint64_t size)
{
    uint8_t buf[4096 + 16];
    int avail, added = 0, code32 = bt_code32(b);
    uint64_t off = 0;

    if (size > 4096)
        size = 4096;
    avail = (int)size + 15;
    while (avail > 0 && bt_read_virt(b, pc, buf, avail) < 0)
        avail--;
    while (off < size && (int)off < avail) {
        struct bt_insn in;
        if (bt_decode_mode(buf + off, avail - (int)off, &in, code32) < 0)
            break;              /* TCG will meet it too, and raise #UD */
        /* in ring 3 (Xen's PV model) port I/O and control-register reads are
         * sensitive too: they fault */
        int ring3_site = ring3_only(in.kind) && b->v->dom->pv_model == HV_PV_XEN;
        int wanted = (b->v->dom->guest_type != HV_GUEST_PVH || pvh_needs_site(&in)) &&
                     !(b->v->dom->pv_model == HV_PV_XEN && !code32 &&
                       interrupt_tells_all(buf + off, in.len));
        if (in.kind != BT_PLAIN && (!ring3_only(in.kind) || ring3_site) && wanted &&
            !site_at(b, pc + off) && add_site(b, pc + off, &in, buf + off) == 0)
            added++;
        off += in.len;
    }
    return added;
}

/* ---- translated code and the stores that change it ----
 *
 * TCG sends the first store through a TLB entry down its slow path, which looks for
 * translated code at the bytes stored. QEMU then lets later stores through that entry
 * take the fast path only while the frame holds no translated code; Unicorn lacks that
 * bookkeeping and instead lets them through whenever the entry cannot fetch and no
 * memory hook covers the frame (its own re-arming after a translation only covers the
 * block's virtual page, and not at all above the end of RAM, where our unmapped hook
 * starts). A block in the frame would then miss the stores that change it. So the
 * engine keeps QEMU's bookkeeping itself, per 4 KiB frame (code_frames), in the TLB
 * fill: a data access to a frame of code gets an entry that can fetch, which keeps
 * every store through it on the slow path, as QEMU does; a frame without code gets
 * one without execute, whose stores go fast after the first (written_frames notes
 * it). When code is first translated from a frame, a fast entry filled before may
 * still sit in the TLB: then the TLB is flushed, so that it is filled again and obeys
 * the rule. So stacks and data next to code take the fast path. */

static int frame_bit(const uint8_t *map, uint64_t frame)
{
    return (map[frame / 8] >> (frame % 8)) & 1;
}

/* Several vCPUs: each Unicorn has its own translated code, which only its own stores
 * invalidate. They run one at a time (the guest lock), so a store by one into a frame
 * another has code in marks that one's code stale, and it drops its translations
 * before it runs again (tb_stale). The store is seen because its TLB fill is: only a
 * store's fill gives a writable entry (note_writable), and when a vCPU first
 * translates code from a frame, the others flush their TLBs, so no writable entry for
 * the frame filled before survives in them. */
static void others_note_written(struct bt_vcpu *b, uint64_t frame)
{
    struct hv_domain *d = b->v->dom;
    for (uint32_t i = 0; i < d->max_vcpus; i++) {
        struct hv_vcpu *o = d->vcpus[i];
        struct bt_vcpu *ob = o && o != b->v && o->engine_ready ? bt_of(o) : NULL;
        if (ob && frame_bit(ob->code_frames, frame))
            ob->tb_stale = 1;
    }
}

static void others_flush_tlb(struct bt_vcpu *b)
{
    struct hv_domain *d = b->v->dom;
    for (uint32_t i = 0; i < d->max_vcpus; i++) {
        struct hv_vcpu *o = d->vcpus[i];
        if (o && o != b->v && o->engine_ready)
            __atomic_store_n(&o->flush_wanted, 1, __ATOMIC_SEQ_CST);
    }
}

/* The TLB fill gives an entry with perms for guest-physical gpa: note a writable one.
 * Without execute its stores go fast after the first (written_frames); with several
 * vCPUs the others' code in the frame goes stale whatever this entry's checks. */
static void note_writable(struct bt_vcpu *b, uint64_t gpa, int perms)
{
    uint64_t frame = gpa / HV_PAGE_SIZE;
    if (!(perms & UC_PROT_WRITE) || frame / 8 >= b->frame_map_bytes)
        return;
    if (!(perms & UC_PROT_EXEC))
        b->written_frames[frame / 8] |= (uint8_t)(1u << (frame % 8));
    if (b->v->dom->max_vcpus > 1)
        others_note_written(b, frame);
}

/* The permissions of the TLB entry for a data access to guest-physical gpa, whose
 * walk allowed perms (see above). */
static int data_entry_perms(struct bt_vcpu *b, uint64_t gpa, int access, int perms)
{
    uint64_t frame = gpa / HV_PAGE_SIZE;
    if (frame / 8 >= b->frame_map_bytes || !frame_bit(b->code_frames, frame))
        return perms & ~UC_PROT_EXEC;
    if ((perms & (UC_PROT_WRITE | UC_PROT_EXEC)) != UC_PROT_WRITE)
        return perms;           /* can fetch: its stores stay checked */
    /* A mapping without execute of a frame of code (Linux's direct map, a temporary
     * mapping to patch code through). Its entry cannot be given execute, which the
     * guest's fetches through it must not find; a load gets a read-only entry, and a
     * store, whose entry will let later ones through unchecked, drops the frame's
     * blocks before the next block runs (drop_stale_frames; the frame then counts as
     * written, and its code as new when it is translated again). The first store
     * through the entry is checked, as any: the rest of this block sees its effect. */
    if (access != UC_MEM_WRITE)
        return perms & ~UC_PROT_WRITE;
    for (int i = 0; i < b->nr_stale_frames; i++)
        if (b->stale_frames[i] == frame)
            return perms;
    if (b->nr_stale_frames < BT_STALE_FRAMES)
        b->stale_frames[b->nr_stale_frames++] = frame;
    else
        b->tb_stale = 1;
    ask_stop(b);
    return perms;
}

/* Drop the blocks of the frames data_entry_perms noted (outside the emulator). Unicorn
 * removes blocks by the virtual address of their page, found through a fetch from the
 * TLB: the TLB fill shows each frame at BT_TRAMP_VA, fetchable, for that moment only. */
static void drop_stale_frames(struct bt_vcpu *b)
{
    for (int i = 0; i < b->nr_stale_frames; i++) {
        uint64_t frame = b->stale_frames[i];
        if (!b->tb_stale) {
            b->dropping_gpa = frame * HV_PAGE_SIZE;
            b->dropping = 1;
            bt_uc.ctl(b->uc, UC_CTL_TLB_FLUSH_W);
            bt_uc.ctl(b->uc, UC_CTL_TB_REMOVE_CACHE_W, (uint64_t)BT_TRAMP_VA,
                      (uint64_t)BT_TRAMP_VA + HV_PAGE_SIZE);
            b->dropping = 0;
            bt_uc.ctl(b->uc, UC_CTL_TLB_FLUSH_W);     /* the page leaves the guest's view */
        }
        b->code_frames[frame / 8] &= (uint8_t)~(1u << (frame % 8));
    }
    b->nr_stale_frames = 0;
}

/* A block was translated from guest-virtual va (just fetched from). */
static void note_code(struct bt_vcpu *b, uint64_t va)
{
    uint64_t gpa, frame;
    int perms, present;

    if (bt_walk(b, va, UC_MEM_FETCH, &gpa, &perms, &present) < 0)
        return;
    frame = gpa / HV_PAGE_SIZE;
    if (frame / 8 >= b->frame_map_bytes || frame_bit(b->code_frames, frame))
        return;
    b->code_frames[frame / 8] |= (uint8_t)(1u << (frame % 8));
    if (b->v->dom->max_vcpus > 1)
        others_flush_tlb(b);
    if (frame_bit(b->written_frames, frame)) {
        bt_uc.ctl(b->uc, UC_CTL_TLB_FLUSH_W);
        memset(b->written_frames, 0, b->frame_map_bytes);
    }
}

static void protect_new_code(struct bt_vcpu *b, const uc_tb *tb)
{
    uint64_t last = tb->pc + (tb->size ? tb->size - 1 : 0);
    note_code(b, tb->pc);
    if ((last ^ tb->pc) >= HV_PAGE_SIZE)
        note_code(b, last);
}

/* TCG has just translated a block and is about to run it. */
static void on_new_block(uc_engine *uc, uc_tb *cur, uc_tb *prev, void *user)
{
    struct bt_vcpu *b = user;
    if (b->tramp_active)
        return;                 /* the VMM's own instruction */
    protect_new_code(b, cur);
    if (scan(b, cur->pc, cur->size) == 0)
        return;
    /* translated without the new hooks: drop it before it runs, translate again */
    if (!b->retranslate_end || cur->pc < b->retranslate_start)
        b->retranslate_start = cur->pc;
    if (cur->pc + cur->size > b->retranslate_end)
        b->retranslate_end = cur->pc + cur->size;
    bt_uc.emu_stop(uc);
}

/* ---- port I/O and hypercalls ---- */

static void set_fatal(struct bt_vcpu *b, int code, const char *what, uint64_t gpa)
{
    if (b->fatal)
        return;
    b->fatal = 1;
    hv_stop_with(&b->fatal_stop, HV_STOP_FAULT, code, bt_reg(b, UC_X86_REG_RIP), what,
                 (unsigned long long)gpa);
}

/* After an exit handled inside a hook: leave the emulator if the loop has work. */
/* Whether the run loop has work before the guest goes on: another thread's (a
 * shutdown, a kick, a pause, events it raised) or the vCPU's (it parks). */
static int work_waits(struct hv_vcpu *v)
{
    return __atomic_load_n(&v->dom->shutting_down, __ATOMIC_ACQUIRE) ||
           __atomic_load_n(&v->kicked, __ATOMIC_ACQUIRE) ||
           __atomic_load_n(&v->paused, __ATOMIC_ACQUIRE) ||
           __atomic_load_n(&v->deferred_events, __ATOMIC_ACQUIRE) || hv_vcpu_must_park(v);
}

void bt_after_exit(struct bt_vcpu *b)
{
    if (work_waits(b->v) || deliverable(b))
        bt_uc.emu_stop(b->uc);
}

/* The same after the PV model delivered what was due (pv_deliver_events): nothing it
 * left is deliverable, and an event another thread raises since comes with a kick. */
void bt_after_delivery(struct bt_vcpu *b)
{
    if (work_waits(b->v))
        bt_uc.emu_stop(b->uc);
}

static uint32_t hypercall(struct bt_vcpu *b)
{
    static const int ids[] = { UC_X86_REG_RAX, UC_X86_REG_RDI, UC_X86_REG_RSI,
                               UC_X86_REG_RDX, UC_X86_REG_R10, UC_X86_REG_R8 };
    struct hv_hcall h;
    void *vals[] = { &h.nr, &h.a1, &h.a2, &h.a3, &h.a4, &h.a5 };
    int64_t ret;
    int32_t result;

    bt_uc.reg_read_batch(b->uc, ids, vals, 6);
    b->v->dom->counters.exits[HV_EXIT_HYPERCALL]++;
    ret = hv_hypercall(b->v, &h);
    result = ret == (int32_t)ret ? (int32_t)ret : -XEN_EOVERFLOW;
    bt_after_exit(b);
    return (uint32_t)result;
}

/* A PVH hypercall (vmcall, vmmcall, the page's `out`): the result goes to rax. */
static void pvh_hypercall(struct bt_vcpu *b)
{
    static const int ids[] = { UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX,
                               UC_X86_REG_RSI, UC_X86_REG_RDI, UC_X86_REG_R8, UC_X86_REG_R10 };
    struct hv_pvh_regs r;
    void *vals[] = { &r.rax, &r.rbx, &r.rcx, &r.rdx, &r.rsi, &r.rdi, &r.r8, &r.r10 };
    uint64_t ret;
    bt_uc.reg_read_batch(b->uc, ids, vals, 8);
    ret = hv_pvh_hypercall(b->v, &r);
    bt_set_reg(b, UC_X86_REG_RAX, ret);
}

/* CPUID of a PVH guest: the Xen leaves are the VMM's, and the leaves where this CPU
 * model says more than TCG (bt_platform.c); 1 means answered. */
static int on_cpuid(uc_engine *uc, void *user)
{
    struct bt_vcpu *b = user;
    uint32_t out[4];
    uint32_t leaf = (uint32_t)bt_reg(b, UC_X86_REG_RAX), subleaf = (uint32_t)bt_reg(b, UC_X86_REG_RCX);
    if (!hv_pvh_cpuid(b->v, leaf, subleaf, out) && !bt_platform_cpuid(b, leaf, subleaf, out))
        return 0;
    bt_set_reg(b, UC_X86_REG_RAX, out[0]);
    bt_set_reg(b, UC_X86_REG_RBX, out[1]);
    bt_set_reg(b, UC_X86_REG_RCX, out[2]);
    bt_set_reg(b, UC_X86_REG_RDX, out[3]);
    return 1;
}

static uint32_t on_in(uc_engine *uc, uint32_t port, int size, void *user)
{
    struct bt_vcpu *b = user;
    struct hv_vcpu *v = b->v;
    uint8_t data[4] = { 0 };
    uint32_t value = 0;

    if (port == TRAPLESS_HYPERCALL_PORT && size == 4)
        return hypercall(b);
    v->dom->counters.exits[HV_EXIT_IO]++;
    if (!hv_devices_port_io(v, (uint16_t)port, size, 0, data)) {
        /* A port nobody claims: reads float high, as on real hardware. */
        v->dom->counters.unknown_port_io++;
        memset(data, 0xff, sizeof(data));
    }
    memcpy(&value, data, (size_t)(size < 4 ? size : 4));
    bt_after_exit(b);
    return value;
}

static void on_out(uc_engine *uc, uint32_t port, int size, uint32_t value, void *user)
{
    struct bt_vcpu *b = user;
    struct hv_vcpu *v = b->v;
    uint8_t data[4];

    if (v->dom->guest_type == HV_GUEST_PVH && port == TRAPLESS_HYPERCALL_PORT && size == 4) {
        pvh_hypercall(b);       /* the PVH hypercall page's `out` */
        bt_after_exit(b);
        return;
    }
    memcpy(data, &value, 4);
    v->dom->counters.exits[HV_EXIT_IO]++;
    if (!hv_devices_port_io(v, (uint16_t)port, size, 1, data))
        v->dom->counters.unknown_port_io++;    /* writes vanish */
    bt_after_exit(b);
}

/* ---- memory: the TLB, the page-table pool, the world outside RAM ---- */

static bool on_unmapped(uc_engine *uc, int type, uint64_t gpa, int size, int64_t value, void *user);

static bool on_tlb_fill(uc_engine *uc, uint64_t va, int access, uc_tlb_entry *e, void *user)
{
    struct bt_vcpu *b = user;
    uint64_t gpa;
    int perms, present;

    if (b->tramp_active && ((va & ~(HV_PAGE_SIZE - 1)) == BT_TRAMP_VA ||
                            (va & ~(HV_PAGE_SIZE - 1)) == BT_TRAMP32_VA)) {
        e->paddr = BT_TRAMP_GPA;    /* the VMM's page, while its instruction runs */
        e->perms = UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC;
        return true;
    }
    if (b->dropping && (va & ~(HV_PAGE_SIZE - 1)) == BT_TRAMP_VA) {
        e->paddr = b->dropping_gpa;     /* drop_stale_frames' lookup */
        e->perms = UC_PROT_READ | UC_PROT_EXEC;
        return true;
    }
    if (bt_walk(b, va, access, &gpa, &perms, &present) == 0) {
        if (gpa == BT_TRAMP_GPA) {
            /* the VMM's page is no guest memory: as any address outside RAM */
            on_unmapped(uc, access == UC_MEM_WRITE ? UC_MEM_WRITE_UNMAPPED :
                        access == UC_MEM_FETCH ? UC_MEM_FETCH_UNMAPPED : UC_MEM_READ_UNMAPPED,
                        gpa, 0, 0, b);
            return false;
        }
        /* Unicorn sends every store through an entry that may fetch down the slow
         * path: a data access's entry has execute only for a frame of code (a fetch
         * from the page fills it again); see data_entry_perms. */
        if (access != UC_MEM_FETCH)
            perms = data_entry_perms(b, gpa, access, perms);
        if (b->v->dom->max_vcpus > 1 && access != UC_MEM_WRITE)
            perms &= ~UC_PROT_WRITE;    /* a store fills again, and is noted */
        note_writable(b, gpa, perms);
        e->paddr = gpa;
        e->perms = perms;
        return true;
    }
    b->fault_va = va;
    b->fault_access = access;
    b->fault_present = present;
    b->fault_rsvd = b->walk_rsvd;
    b->fault_noncanonical = (va >> 47) != 0 && (va >> 47) != 0x1ffff;
    return false;               /* the emulator stops at the instruction: UC_ERR_EXCEPTION */
}

/* A store into the read-only page-table pool: the VMM validates and applies it (the
 * trapped PTE write of a native guest), as for KVM's MMIO exit. The region is read-only,
 * so TCG drops the store itself after this hook says it was handled. */
static bool on_pool_write(uc_engine *uc, int type, uint64_t gpa, int size, int64_t value, void *user)
{
    struct bt_vcpu *b = user;
    struct hv_vcpu *v = b->v;
    uint8_t data[8];

    memcpy(data, &value, sizeof(data));
    v->dom->counters.exits[HV_EXIT_MMIO]++;
    if (size <= 8 && hv_devices_mmio(v, gpa, size, 1, data)) {
        bt_after_exit(b);
        return true;
    }
    set_fatal(b, UC_ERR_WRITE_PROT, "direct write to page-table frame at guest-physical %#llx "
              "(page tables change only through mmu_update)", gpa);
    bt_uc.emu_stop(uc);
    return false;
}

/* A guest-physical address outside RAM (a PTE of a native guest can name one). There
 * are no memory-mapped devices; KVM reports the same access the same way. */
static bool on_unmapped(uc_engine *uc, int type, uint64_t gpa, int size, int64_t value, void *user)
{
    struct bt_vcpu *b = user;
    b->v->dom->counters.exits[HV_EXIT_MMIO]++;
    set_fatal(b, type, type == UC_MEM_WRITE_UNMAPPED ? "write of guest-physical %#llx, outside guest memory" :
              type == UC_MEM_FETCH_UNMAPPED ? "fetch from guest-physical %#llx, outside guest memory" :
              "read of guest-physical %#llx, outside guest memory", gpa);
    bt_uc.emu_stop(uc);
    return false;
}

/* ---- exceptions TCG raises ---- */

static int has_error_code(int vector)
{
    return vector == 8 || (vector >= 10 && vector <= 14) || vector == 17 || vector == 21 ||
           vector == 29 || vector == 30;
}

/* The instruction at rip decoded, or -1. */
static int decode_at(struct bt_vcpu *b, uint64_t rip, struct bt_insn *in)
{
    uint8_t code[15];
    int avail = 15;
    while (avail > 0 && bt_read_virt(b, rip, code, avail) < 0)
        avail--;
    return avail ? bt_decode_mode(code, avail, in, bt_code32(b)) : -1;
}

/* QEMU remembers the last contributory exception (#DE, #GP ...) and, as it never
 * delivers one itself, never forgets it: it reports the next contributory one as #DF,
 * and anything after that as a silent halt (its triple fault). Only our delivery knows
 * whether an exception is in flight, and none is when the guest runs: the instruction
 * at rip raised its own fault, which its opcode tells. */
static void fault_of_instruction(struct bt_vcpu *b, uint64_t rip, struct bt_event *ev)
{
    struct bt_insn in;
    memset(ev, 0, sizeof(*ev));
    if (decode_at(b, rip, &in) < 0 ||
        (in.map == 1 && (in.opcode == 0x0b || in.opcode == 0xb9 || in.opcode == 0xff))) {
        ev->vector = 6;         /* not an instruction, or ud0/ud1/ud2: #UD */
    } else if (bt_is_divide(&in)) {
        ev->vector = 0;         /* #DE */
    } else {
        ev->vector = 13;        /* #GP(0) */
        ev->has_error = 1;
    }
}

/* #NM from TCG, which checks CR0.TS first. The CPU raises #UD first for an MMX or SSE
 * instruction when CR0.EM is set, and for an SSE one when CR4.OSFXSR is clear (x87,
 * wait, fxsave/xsave and the VEX forms keep their #NM). */
static int nm_is_ud(struct bt_vcpu *b, uint64_t rip)
{
    struct bt_insn in;
    uint8_t op;
    int mmx;

    if (decode_at(b, rip, &in) < 0 || in.map == 0 || in.vex || (in.map == 1 && in.opcode == 0xae))
        return 0;
    if (bt_reg(b, UC_X86_REG_CR0) & (1ULL << 2))            /* EM */
        return 1;
    op = in.opcode;
    mmx = in.map == 1 && !in.simd_prefix && ((op >= 0x60 && op <= 0x7f) || op >= 0xd0);
    return !mmx && !(bt_reg(b, UC_X86_REG_CR4) & (1ULL << 9));    /* OSFXSR */
}

static void on_interrupt(uc_engine *uc, uint32_t intno, void *user)
{
    struct bt_vcpu *b = user;
    struct bt_event event = { .vector = (int)intno }, *ev = &event;
    uint64_t rip = b->uc_regs ? b->uc_regs[16] : bt_reg(b, UC_X86_REG_RIP);
    int int_n = b->soft_int_end == rip;     /* the hooked int3/int n/into just ran */

    b->soft_int_end = ~0ULL;
    if (intno == 8 && !int_n) {
        fault_of_instruction(b, rip, ev);
    } else if (int_n || ev->vector == 3 || ev->vector == 4 || ev->vector >= 32) {
        ev->soft = 1;           /* int3, into, int n: rip is already past them */
        ev->insn_len = int_n ? b->soft_int_len : ev->vector < 32 ? 1 : 2;
    } else if (has_error_code(ev->vector)) {
        ev->has_error = 1;      /* QEMU keeps the code to itself; #GP(0) is the usual one */
    } else if (ev->vector == 7 && nm_is_ud(b, rip)) {
        ev->vector = 6;
    }
    b->exception.vector = -1;
    if (b->v->dom->pv_model == HV_PV_XEN && !b->tramp_active) {
        int done;
        b->in_intr_hook = 1;
        done = bt_pv_soft_interrupt(b, ev);
        b->in_intr_hook = 0;
        if (done)
            return;
    }
    b->exception = *ev;                 /* the run loop's to deliver */
    bt_uc.emu_stop(uc);
}

/* ---- syscall of a PVH guest ---- */

#define MSR_EFER  0xc0000080
#define MSR_STAR  0xc0000081
#define MSR_LSTAR 0xc0000082
#define MSR_CSTAR 0xc0000083
#define MSR_FMASK 0xc0000084
#define EFER_SCE  (1ULL << 0)

/* Unicorn only calls its hooks for `syscall` and moves on: note it and stop (the
 * block ends there), and the run loop does what the CPU does. */
static void on_pvh_syscall(uc_engine *uc, void *user)
{
    struct bt_vcpu *b = user;
    b->pvh_syscall_pending = 1;
    b->pvh_syscall_at = bt_reg(b, UC_X86_REG_RIP);
    bt_uc.emu_stop(uc);
}

static uint64_t msr(struct bt_vcpu *b, uint32_t index)
{
    uc_x86_msr m = { .rid = index };
    bt_uc.reg_read(b->uc, UC_X86_REG_MSR, &m);
    return m.value;
}

/* The CPU's `syscall` in long mode: #UD without EFER.SCE; rcx = the next rip, r11 =
 * rflags; CS = STAR[47:32] and SS = that + 8 in ring 0; rip = LSTAR (CSTAR from
 * compat mode); rflags &= ~FMASK, RF clear. 0, or -1 with stop filled. */
static int pvh_syscall(struct bt_vcpu *b, struct hv_stop *stop)
{
    uint64_t next = bt_reg(b, UC_X86_REG_RIP), rflags = bt_reg(b, UC_X86_REG_RFLAGS);
    uint64_t star = msr(b, MSR_STAR), cs = (star >> 32) & 0xfffc, ss = cs + 8;
    uint64_t target = msr(b, bt_code32(b) ? MSR_CSTAR : MSR_LSTAR), desc;
    int from_user = (bt_reg(b, UC_X86_REG_CS) & 3) == 3;

    b->v->dom->counters.exits[HV_EXIT_PRIV_INSN]++;
    if (next == b->pvh_syscall_at)
        next += 2;              /* still at it: past the 0f 05 */
    if (!(msr(b, MSR_EFER) & EFER_SCE)) {
        bt_set_reg(b, UC_X86_REG_RIP, b->pvh_syscall_at);
        memset(&b->exception, 0, sizeof(b->exception));
        b->exception.vector = 6;
        return 0;
    }
    /* the CPU takes fixed flat attributes for CS; Unicorn's call gate (from ring 3)
     * takes the GDT's, so that descriptor must be a 64-bit code segment of DPL 0 */
    b->kernel_view = 1;
    /* P, DPL 0, S, code (bits 47..43), and L */
    if (bt_gdt_entry(b, (uint16_t)cs, &desc) < 0 || ((desc >> 43) & 0x1f) != 0x13 ||
        !((desc >> 53) & 1)) {
        b->kernel_view = 0;
        return hv_stop_with(stop, HV_STOP_FAULT, 6, b->pvh_syscall_at, "syscall: STAR's "
                            "code selector %#llx is not a 64-bit ring-0 code segment of "
                            "the GDT", (unsigned long long)cs), -1;
    }
    b->kernel_view = 0;
    if (from_user && bt_enter_ring0(b, (uint16_t)cs, desc) < 0)
        return hv_stop_with(stop, HV_STOP_FAULT, 6, b->pvh_syscall_at, "syscall: cannot "
                            "enter ring 0 at code selector %#llx", (unsigned long long)cs), -1;
    /* the selectors STAR names (in 64-bit mode Unicorn takes a write as the selector
     * alone; the ring is 0 already) */
    bt_set_reg(b, UC_X86_REG_CS, cs);
    bt_set_reg(b, UC_X86_REG_SS, ss);
    bt_set_reg(b, UC_X86_REG_RCX, next);
    bt_set_reg(b, UC_X86_REG_R11, rflags & ~RFLAGS_RF);
    bt_set_reg(b, UC_X86_REG_RFLAGS, (rflags & ~msr(b, MSR_FMASK) & ~RFLAGS_RF) | 2);
    bt_set_reg(b, UC_X86_REG_RIP, target);
    return 0;
}

/* ---- vCPUs ---- */

static int uc_fail(char *err, int err_len, const char *what, uc_err e)
{
    hv_set_error(err, err_len, "Unicorn %s: %s", what, bt_uc.strerror(e));
    return -1;
}

void bt_vcpu_destroy(struct hv_vcpu *v)
{
    struct bt_vcpu *b = bt_of(v);
    if (!b)
        return;
    kq_forget(b);
    if (b->uc)
        bt_uc.close(b->uc);
    for (int i = 0; i < BT_SITE_BUCKETS; i++) {
        struct bt_site *s = b->sites[i];
        while (s) {
            struct bt_site *next = s->next;
            free(s);
            s = next;
        }
    }
    pthread_mutex_destroy(&b->kick_lock);
    free(b->written_frames);
    free(b->code_frames);
    free(b->twin_code);
    free(b->tramp);
    free(b);
    v->engine_priv = NULL;
}

static int map_ram(struct bt_vcpu *b, uint64_t start, uint64_t end, uint32_t perms,
                   char *err, int err_len)
{
    struct hv_domain *d = b->v->dom;
    uc_err e;
    if (start == end)
        return 0;
    e = bt_uc.mem_map_ptr(b->uc, start, end - start, UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC,
                          d->ram + start);
    if (e != UC_ERR_OK)
        return uc_fail(err, err_len, "cannot map guest memory", e);
    /* mem_protect, not the mapping's own flags, makes TCG drop refused stores */
    if (perms != (UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC) &&
        (e = bt_uc.mem_protect(b->uc, start, end - start, perms)) != UC_ERR_OK)
        return uc_fail(err, err_len, "cannot protect the page-table pool", e);
    return 0;
}

/* A PVH guest's space outside RAM below 4 GiB (pvh.c): the local APIC's page and the
 * empty rest, as MMIO regions whose accesses go to the VMM. */
static uint64_t on_platform_read(uc_engine *uc, uint64_t offset, unsigned size, void *user)
{
    struct bt_vcpu *b = user;
    uint64_t value = 0;
    b->v->dom->counters.exits[HV_EXIT_MMIO]++;
    hv_pvh_mmio(b->v, b->mmio_base + offset, (int)size, 0, (uint8_t *)&value);
    return value;
}

static void on_platform_write(uc_engine *uc, uint64_t offset, unsigned size, uint64_t value, void *user)
{
    struct bt_vcpu *b = user;
    b->v->dom->counters.exits[HV_EXIT_MMIO]++;
    hv_pvh_mmio(b->v, b->mmio_base + offset, (int)size, 1, (uint8_t *)&value);
    /* an EOI or a self-IPI may have made a vector deliverable: stop at the next block
     * (a stop from inside an access would leave a stale RIP, as in ask_stop) */
    if (deliverable(b))
        ask_stop(b);
}

/* A PVH guest's space that is neither RAM nor the local APIC, up to
 * HV_PVH_PLACE_LIMIT: a grant-table frame the guest placed there answers (hv_pvh_mmio);
 * else below 4 GiB reads are all ones and writes dropped, above it the access stops the
 * domain as outside its memory (kvm the same). Three regions: below the APIC page,
 * above it, above 4 GiB; each callback gets the offset from its region's start. */
static uint64_t hole_access(struct bt_vcpu *b, uint64_t gpa, unsigned size, int is_write,
                            uint64_t value)
{
    b->v->dom->counters.exits[HV_EXIT_MMIO]++;
    if (!hv_pvh_mmio(b->v, gpa, (int)size, is_write, (uint8_t *)&value)) {
        /* above 4 GiB only a placed frame answers: the rest is outside guest memory */
        set_fatal(b, is_write ? UC_MEM_WRITE_UNMAPPED : UC_MEM_READ_UNMAPPED,
                  is_write ? "write of guest-physical %#llx, outside guest memory"
                           : "read of guest-physical %#llx, outside guest memory", gpa);
        bt_uc.emu_stop(b->uc);
    }
    return value;
}

static uint64_t below_apic_start(struct bt_vcpu *b)
{
    return b->v->dom->ram_bytes + b->v->dom->gnt_bytes;
}

static uint64_t on_hole_read(uc_engine *uc, uint64_t offset, unsigned size, void *user)
{
    return hole_access(user, below_apic_start(user) + offset, size, 0, 0);
}

static void on_hole_write(uc_engine *uc, uint64_t offset, unsigned size, uint64_t value, void *user)
{
    hole_access(user, below_apic_start(user) + offset, size, 1, value);
}

static uint64_t on_hole_above_read(uc_engine *uc, uint64_t offset, unsigned size, void *user)
{
    return hole_access(user, HV_LAPIC_GPA + HV_PAGE_SIZE + offset, size, 0, 0);
}

static void on_hole_above_write(uc_engine *uc, uint64_t offset, unsigned size, uint64_t value,
                                void *user)
{
    hole_access(user, HV_LAPIC_GPA + HV_PAGE_SIZE + offset, size, 1, value);
}

static uint64_t on_high_read(uc_engine *uc, uint64_t offset, unsigned size, void *user)
{
    return hole_access(user, (1ULL << 32) + offset, size, 0, 0);
}

static void on_high_write(uc_engine *uc, uint64_t offset, unsigned size, uint64_t value, void *user)
{
    hole_access(user, (1ULL << 32) + offset, size, 1, value);
}

static int map_pvh_platform(struct bt_vcpu *b, char *err, int err_len)
{
    /* the hole begins after the RAM and the grant region that follows it */
    uint64_t ram_end = below_apic_start(b),
             apic_end = HV_LAPIC_GPA + HV_PAGE_SIZE;
    uc_err e;

    b->mmio_base = HV_LAPIC_GPA;
    if ((e = bt_uc.mmio_map(b->uc, HV_LAPIC_GPA, HV_PAGE_SIZE, on_platform_read, b,
                            on_platform_write, b)) != UC_ERR_OK)
        return uc_fail(err, err_len, "cannot map the local APIC", e);
    if (ram_end < HV_LAPIC_GPA &&
        (e = bt_uc.mmio_map(b->uc, ram_end, HV_LAPIC_GPA - ram_end, on_hole_read, b,
                            on_hole_write, b)) != UC_ERR_OK)
        return uc_fail(err, err_len, "cannot map the space below the local APIC", e);
    /* up to the VMM's own ring-change page, the last below 4 GiB */
    if ((e = bt_uc.mmio_map(b->uc, apic_end, BT_TRAMP_GPA - apic_end, on_hole_above_read, b,
                            on_hole_above_write, b)) != UC_ERR_OK)
        return uc_fail(err, err_len, "cannot map the space above the local APIC", e);
    /* from 4 GiB to where grant-table frames may be placed (hv_gnt_add_to_physmap) */
    if ((e = bt_uc.mmio_map(b->uc, 1ULL << 32, HV_PVH_PLACE_LIMIT - (1ULL << 32), on_high_read, b,
                            on_high_write, b)) != UC_ERR_OK)
        return uc_fail(err, err_len, "cannot map the space above 4 GiB", e);
    return 0;
}

/* The hooks on refused and unmapped accesses, each bounded to the guest-physical
 * range where it can fire. Bounds matter for speed: Unicorn keeps a RAM page's TLB
 * entry on its slow store path (TLB_NOTDIRTY: a region lookup, a check for translated
 * code) for as long as any memory hook's range covers the page, so unbounded hooks
 * would make every guest store a helper call. RAM is [0, ram + grant region) and all
 * mapped: unmapped accesses lie above it; the read-only regions are the page-table
 * pool and the hypervisor's region. Unicorn's ranges are inclusive, and an empty one
 * (begin > end) would mean everywhere, so an empty region gets no hook. */
static int add_memory_hooks(struct bt_vcpu *b, char *err, int err_len)
{
    struct hv_domain *d = b->v->dom;
    uint64_t ram_end = d->ram_bytes + d->gnt_bytes;
    struct { int type; void *cb; uint64_t start, bytes; } hooks[] = {
        /* from the end of RAM to the top of the address space: 2^64 - ram_end bytes */
        { UC_HOOK_MEM_READ_UNMAPPED | UC_HOOK_MEM_WRITE_UNMAPPED | UC_HOOK_MEM_FETCH_UNMAPPED,
          (void *)on_unmapped, ram_end, 0 - ram_end },
        { UC_HOOK_MEM_WRITE_PROT, (void *)on_pool_write, d->pt_pool_start,
          d->pt_pool_end - d->pt_pool_start },
        { UC_HOOK_MEM_WRITE_PROT, (void *)on_pool_write, PV_REGION_GPA,
          d->pv_region ? d->pv_region_bytes : 0 },
    };
    for (size_t i = 0; i < sizeof(hooks) / sizeof(hooks[0]); i++) {
        uc_hook hh;
        uc_err e;
        if (hooks[i].bytes == 0)
            continue;
        e = bt_uc.hook_add(b->uc, &hh, hooks[i].type, hooks[i].cb, b, hooks[i].start,
                           hooks[i].start + hooks[i].bytes - 1);
        if (e != UC_ERR_OK)
            return uc_fail(err, err_len, "cannot add a memory hook", e);
    }
    return 0;
}

/* A Unicorn CPU for v with guest memory and every hook, as engine_priv: a bt vCPU's,
 * or a kvm vCPU's twin (bt_twin.c). 0, or -1 with err filled (nothing left behind). */
int bt_vcpu_open(struct hv_vcpu *v, char *err, int err_len)
{
    struct hv_domain *d = v->dom;
    struct bt_vcpu *b;
    uc_hook hh;
    uc_err e;

    if (!bt_available(err, err_len))
        return -1;
    b = calloc(1, sizeof(*b));
    if (!b) {
        hv_set_error(err, err_len, "out of host memory");
        return -1;
    }
    b->v = v;
    b->exception.vector = -1;
    b->soft_int_end = ~0ULL;
    pthread_mutex_init(&b->kick_lock, NULL);
    v->engine_priv = b;
    
    if ((e = bt_uc.open(UC_ARCH_X86, UC_MODE_64, &b->uc)) != UC_ERR_OK) {
        b->uc = NULL;
        uc_fail(err, err_len, "cannot start an x86-64 CPU", e);
        goto fail;
    }
    bt_uc.ctl(b->uc, UC_CTL_TCG_BUFFER_SIZE_W, (uint32_t)TCG_BUFFER_BYTES);
    if ((e = bt_uc.ctl(b->uc, UC_CTL_TLB_TYPE_W, UC_TLB_VIRTUAL)) != UC_ERR_OK) {
        uc_fail(err, err_len, "cannot take over the TLB", e);
        goto fail;
    }
    /* the page bt_enter_ring0 runs from: rex.w call far [rip + far_ptr] */
    _Static_assert(sizeof(struct bt_tramp) == HV_PAGE_SIZE, "struct bt_tramp is one page");
    if (posix_memalign((void **)&b->tramp, HV_PAGE_SIZE, HV_PAGE_SIZE) != 0) {
        b->tramp = NULL;
        hv_set_error(err, err_len, "out of host memory");
        goto fail;
    }
    b->frame_map_bytes = ((d->ram_bytes + d->gnt_bytes) / HV_PAGE_SIZE + 8) / 8;
    b->written_frames = calloc(b->frame_map_bytes, 1);
    b->code_frames = calloc(b->frame_map_bytes, 1);
    if (!b->written_frames || !b->code_frames) {
        hv_set_error(err, err_len, "out of host memory");
        goto fail;
    }
    memset(b->tramp, 0xcc, HV_PAGE_SIZE);
    {
        int32_t disp = (int32_t)(offsetof(struct bt_tramp, far_ptr) - 7);
        memcpy(b->tramp->code, "\x48\xff\x1d", 3);
        memcpy(b->tramp->code + 3, &disp, 4);
        memcpy(b->tramp->iret, "\x48\xcf", 2);
        b->tramp->iret32[0] = 0xcf;     /* iretd, run in compat mode */
        /* cpuid; jmp landing */
        int8_t back = (int8_t)((int)offsetof(struct bt_tramp, landing) -
                               (int)(offsetof(struct bt_tramp, cpuid) + 4));
        memcpy(b->tramp->cpuid, "\x0f\xa2\xeb", 3);
        memcpy(b->tramp->cpuid + 3, &back, 1);
        /* xsetbv; jmp landing */
        back = (int8_t)((int)offsetof(struct bt_tramp, landing) -
                        (int)(offsetof(struct bt_tramp, xsetbv) + 5));
        memcpy(b->tramp->xsetbv, "\x0f\x01\xd1\xeb", 4);
        memcpy(b->tramp->xsetbv + 4, &back, 1);
        memset(b->tramp->far_ptr, 0, sizeof(b->tramp->far_ptr));
    }
    if ((e = bt_uc.mem_map_ptr(b->uc, BT_TRAMP_GPA, HV_PAGE_SIZE,
                               UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC, b->tramp)) != UC_ERR_OK) {
        uc_fail(err, err_len, "cannot map the ring-change page", e);
        goto fail;
    }
    /* RAM below the page-table pool, the pool (read-only to the guest), RAM above and
     * the grant region after it */
    if (map_ram(b, 0, d->pt_pool_start, UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC, err, err_len) < 0 ||
        map_ram(b, d->pt_pool_start, d->pt_pool_end, UC_PROT_READ | UC_PROT_EXEC, err, err_len) < 0 ||
        map_ram(b, d->pt_pool_end, d->ram_bytes + d->gnt_bytes, UC_PROT_READ | UC_PROT_WRITE | UC_PROT_EXEC, err, err_len) < 0)
        goto fail;
    if (d->guest_type == HV_GUEST_PVH && map_pvh_platform(b, err, err_len) < 0)
        goto fail;
    if (d->pv_region) {
        /* the hypervisor's region (read-only) and `syscall` for Xen's PV model */
        if ((e = bt_uc.mem_map_ptr(b->uc, PV_REGION_GPA, d->pv_region_bytes, UC_PROT_READ,
                                   d->pv_region)) != UC_ERR_OK) {
            uc_fail(err, err_len, "cannot map the hypervisor region", e);
            goto fail;
        }
        /* syscall's hook as the library's one syscall callback where it has one
         * (uc-5-syscall.patch): a hypercall then walks no list of hooks */
        if ((bt_uc.syscall_callback ?
             (e = bt_uc.syscall_callback(b->uc, bt_pv_on_syscall, b)) :
             (e = bt_uc.hook_add(b->uc, &hh, UC_HOOK_INSN, (void *)bt_pv_on_syscall, b, 1, 0,
                                 UC_X86_INS_SYSCALL))) != UC_ERR_OK ||
            (e = bt_uc.hook_add(b->uc, &hh, UC_HOOK_INSN, (void *)bt_pv_on_sysenter, b, 1, 0,
                                UC_X86_INS_SYSENTER)) != UC_ERR_OK) {
            uc_fail(err, err_len, "cannot add the syscall hooks", e);
            goto fail;
        }
        b->uc_regs = bt_uc.x86_regs ? bt_uc.x86_regs(b->uc) : NULL;
        /* int3 and int n bounce from the interrupt hook inside the translated code,
         * as syscall's hooks run, where the library can (uc-4-tlb.patch) */
        if (bt_uc.soft_int_in_place)
            bt_uc.soft_int_in_place(b->uc, true);
        b->tlb_gen = bt_uc.tlb_gen ? bt_uc.tlb_gen(b->uc) : NULL;
        b->uc_gs_base = bt_uc.gs_base ? bt_uc.gs_base(b->uc) : NULL;
    }

    struct { int type; void *cb; int insn; } hooks[] = {
        { UC_HOOK_INSN, (void *)on_in, UC_X86_INS_IN },
        { UC_HOOK_INSN, (void *)on_out, UC_X86_INS_OUT },
        { UC_HOOK_INTR, (void *)on_interrupt, 0 },
        { UC_HOOK_TLB_FILL, (void *)on_tlb_fill, 0 },
        { UC_HOOK_EDGE_GENERATED, (void *)on_new_block, 0 },
        { UC_HOOK_BLOCK, (void *)on_block, 0 },     /* last: may be left out (below) */
    };
    /* The block hook answers kicks with a stock libunicorn and counts the blocks of a
     * time slice (BT_SLICE_BLOCKS) for a domain whose vCPUs take turns; a
     * one-vCPU domain on the patched build runs without it. */
    size_t nr_hooks = sizeof(hooks) / sizeof(hooks[0]);
    if (bt_uc.kick && d->max_vcpus <= 1)
        nr_hooks--;
    for (size_t i = 0; i < nr_hooks; i++) {
        if (hooks[i].type == UC_HOOK_INSN)
            e = bt_uc.hook_add(b->uc, &hh, hooks[i].type, hooks[i].cb, b, 1, 0, hooks[i].insn);
        else
            e = bt_uc.hook_add(b->uc, &hh, hooks[i].type, hooks[i].cb, b, 1, 0);
        if (e != UC_ERR_OK) {
            uc_fail(err, err_len, "cannot add a hook", e);
            goto fail;
        }
    }
    if (add_memory_hooks(b, err, err_len) < 0)
        goto fail;
    if (d->guest_type == HV_GUEST_PVH &&
        (e = bt_uc.hook_add(b->uc, &hh, UC_HOOK_INSN, (void *)on_pvh_syscall, b, 1, 0,
                            UC_X86_INS_SYSCALL)) != UC_ERR_OK) {
        uc_fail(err, err_len, "cannot add the syscall hook", e);
        goto fail;
    }
    if (d->guest_type == HV_GUEST_PVH &&
        (e = bt_uc.hook_add(b->uc, &hh, UC_HOOK_INSN, (void *)on_cpuid, b, 1, 0,
                            UC_X86_INS_CPUID)) != UC_ERR_OK) {
        uc_fail(err, err_len, "cannot add the CPUID hook", e);
        goto fail;
    }
    pthread_once(&kq_once, kq_start);
    if (!kq_running) {
        hv_set_error(err, err_len, "cannot start the kicker thread");
        goto fail;
    }
    return 0;
fail:
    bt_vcpu_destroy(v);
    return -1;
}

static int bt_vcpu_create(struct hv_vcpu *v, char *err, int err_len)
{
    if (bt_vcpu_open(v, err, err_len) < 0)
        return -1;
    v->ops = &bt_vcpu_ops;
    /* Guest rdtsc in TCG is the host's TSC, unscaled: offset 0, the host's rate. */
    pthread_once(&tsc_once, calibrate_tsc);
    if (hv_pvclock_init(v, 0, tsc_khz) < 0) {
        hv_set_error(err, err_len, "cannot measure the host TSC rate");
        bt_vcpu_destroy(v);
        return -1;
    }
    return 0;
}

/* A PVH guest's entry: 32-bit flat protected mode, paging off, ebx = hvm_start_info.
 * Unicorn's x86-64 CPU starts in 64-bit mode and, in that mode, takes a segment
 * register write as a selector only; TCG leaves long mode when paging goes off, so
 * the VMM turns paging on (long mode, as Unicorn has it) and off again: what is left
 * is 32-bit code with the flat segments Unicorn starts with (base 0), and the guest's
 * own far jump loads the descriptors it wants later. */
static int pvh_boot_state(struct bt_vcpu *b, const struct hv_boot_state *bs, char *err, int err_len)
{
    uc_x86_mmr gdtr = { .base = bs->gdt_base, .limit = bs->gdt_limit }, idtr = { 0 };
    uc_x86_mmr tr = { .limit = 0x67, .flags = 0x8b00 };    /* busy 32-bit TSS, present */
    uc_x86_msr efer = { .rid = 0xc0000080, .value = 0x100 };
    uint16_t code = bs->code_selector, data = bs->data_selector;
    uc_err e;

    bt_set_reg(b, UC_X86_REG_CR4, 0x20);                    /* PAE: long mode may start */
    if ((e = bt_uc.reg_write(b->uc, UC_X86_REG_MSR, &efer)) != UC_ERR_OK)
        return uc_fail(err, err_len, "cannot set EFER", e);
    bt_set_reg(b, UC_X86_REG_CR0, 0x80000011);              /* PG: long mode on ... */
    bt_set_reg(b, UC_X86_REG_CR0, 0x11);                    /* ... and off: ET PE */
    bt_set_reg(b, UC_X86_REG_CR4, 0);
    bt_set_reg(b, UC_X86_REG_CR3, 0);
    efer.value = 0;
    if ((e = bt_uc.reg_write(b->uc, UC_X86_REG_MSR, &efer)) != UC_ERR_OK)
        return uc_fail(err, err_len, "cannot clear EFER", e);
    if ((e = bt_uc.reg_write(b->uc, UC_X86_REG_GDTR, &gdtr)) != UC_ERR_OK ||
        (e = bt_uc.reg_write(b->uc, UC_X86_REG_IDTR, &idtr)) != UC_ERR_OK ||
        (e = bt_uc.reg_write(b->uc, UC_X86_REG_TR, &tr)) != UC_ERR_OK)
        return uc_fail(err, err_len, "cannot set the descriptor tables", e);
    bt_uc.reg_write(b->uc, UC_X86_REG_CS, &code);
    bt_uc.reg_write(b->uc, UC_X86_REG_SS, &data);
    bt_uc.reg_write(b->uc, UC_X86_REG_DS, &data);
    bt_uc.reg_write(b->uc, UC_X86_REG_ES, &data);
    for (int id = 0; id < 16; id++) {
        static const int gprs[] = {
            UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RSI,
            UC_X86_REG_RDI, UC_X86_REG_RBP, UC_X86_REG_RSP, UC_X86_REG_R8, UC_X86_REG_R9,
            UC_X86_REG_R10, UC_X86_REG_R11, UC_X86_REG_R12, UC_X86_REG_R13, UC_X86_REG_R14,
            UC_X86_REG_R15,
        };
        bt_set_reg(b, gprs[id], 0);
    }
    bt_set_reg(b, UC_X86_REG_RBX, bs->rbx);
    bt_set_reg(b, UC_X86_REG_RIP, bs->rip);
    bt_set_reg(b, UC_X86_REG_RFLAGS, 0x2);
    {
        uint16_t fcw = 0x37f;
        uint32_t mxcsr = 0x1f80;
        bt_uc.reg_write(b->uc, UC_X86_REG_FPCW, &fcw);
        bt_uc.reg_write(b->uc, UC_X86_REG_MXCSR, &mxcsr);
    }
    scan(b, bs->rip, 4096);     /* the first block, as in bt_set_boot_state */
    note_code(b, bs->rip);
    return 0;
}

static int bt_set_boot_state(struct hv_vcpu *v, const struct hv_boot_state *bs, char *err, int err_len)
{
    struct bt_vcpu *b = bt_of(v);
    uc_x86_mmr gdtr = { .base = bs->gdt_base, .limit = bs->gdt_limit }, idtr = { 0 };
    uc_x86_msr efer = { .rid = 0xc0000080, .value = 0xd00 };   /* NXE LMA LME */
    static const int zeroed[] = {
        UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RDI,
        UC_X86_REG_RBP, UC_X86_REG_R8, UC_X86_REG_R9, UC_X86_REG_R10, UC_X86_REG_R11,
        UC_X86_REG_R12, UC_X86_REG_R13, UC_X86_REG_R14, UC_X86_REG_R15,
    };
    uint16_t code = bs->code_selector, data = bs->data_selector;
    uint64_t zero = 0;
    uint64_t cr4 = 0x620;               /* OSXMMEXCPT OSFXSR PAE */
    uc_err e;

    if (bs->mode == HV_BOOT_PVH32)
        return pvh_boot_state(b, bs, err, err_len);
    if (bt_write_cr3(b, bs->cr3) < 0 ||
        (e = bt_uc.reg_write(b->uc, UC_X86_REG_CR4, &cr4)) != UC_ERR_OK) {
        hv_set_error(err, err_len, "cannot set a control register");
        return -1;
    }
    if ((e = bt_uc.reg_write(b->uc, UC_X86_REG_MSR, &efer)) != UC_ERR_OK)
        return uc_fail(err, err_len, "cannot set EFER", e);
    bt_set_reg(b, UC_X86_REG_CR0, 0x80050033);      /* PG WP NE ET MP PE */
    if ((e = bt_uc.reg_write(b->uc, UC_X86_REG_GDTR, &gdtr)) != UC_ERR_OK ||
        (e = bt_uc.reg_write(b->uc, UC_X86_REG_IDTR, &idtr)) != UC_ERR_OK)
        return uc_fail(err, err_len, "cannot set the descriptor tables", e);
    /* In 64-bit mode Unicorn takes these as selectors only: the flat descriptors the
     * builder's GDT holds are what the CPU starts with anyway. */
    bt_uc.reg_write(b->uc, UC_X86_REG_CS, &code);
    bt_uc.reg_write(b->uc, UC_X86_REG_SS, &data);
    bt_uc.reg_write(b->uc, UC_X86_REG_DS, &data);
    bt_uc.reg_write(b->uc, UC_X86_REG_ES, &data);
    for (size_t i = 0; i < sizeof(zeroed) / sizeof(zeroed[0]); i++)
        bt_uc.reg_write(b->uc, zeroed[i], &zero);
    bt_set_reg(b, UC_X86_REG_RIP, bs->rip);
    bt_set_reg(b, UC_X86_REG_RSP, bs->rsp);
    bt_set_reg(b, UC_X86_REG_RSI, bs->rsi);
    bt_set_reg(b, UC_X86_REG_RFLAGS, 0x2);          /* interrupts off until the guest is ready */
    {
        uint16_t fcw = 0x37f;
        uint32_t mxcsr = 0x1f80;
        bt_uc.reg_write(b->uc, UC_X86_REG_FPCW, &fcw);
        bt_uc.reg_write(b->uc, UC_X86_REG_MXCSR, &mxcsr);
    }
    if (v->dom->pv_model == HV_PV_XEN && bt_pv_boot(b, bs, err, err_len) < 0)
        return -1;
    /* The very first block has no predecessor, so no edge hook sees it: hook the
     * sensitive instructions near the entry point before anything is translated, and
     * count its frame as code. */
    scan(b, bs->rip, 4096);
    note_code(b, bs->rip);
    return 0;
}

/* ---- the run loop ---- */

/* The VMM's version of a sensitive instruction the hooks stopped in front of.
 * 0 done (or left to TCG), -1 the vCPU must stop (stop filled). */
static int emulate(struct bt_vcpu *b, struct bt_site *s, struct hv_stop *stop)
{
    struct hv_vcpu *v = b->v;
    struct hv_counters *c = &v->dom->counters;
    uint64_t rip = s->addr, rflags = bt_reg(b, UC_X86_REG_RFLAGS), rsp = bt_reg(b, UC_X86_REG_RSP);

    if (v->dom->pv_model == HV_PV_XEN)
        return bt_pv_site(b, s, stop);
    switch (s->kind) {
    case BT_HLT:
        c->exits[HV_EXIT_HLT]++;
        if (!(rflags & RFLAGS_IF)) {
            hv_stop_with(stop, HV_STOP_FAULT, BT_HLT, rip,
                         "hlt with interrupts disabled: nothing can wake the vCPU");
            return -1;
        }
        bt_set_reg(b, UC_X86_REG_RIP, rip + s->len);
        /* Idle until an interrupt can be delivered (or the toolstack stops us). */
        c->blocks++;
        hv_vcpu_park(v, HV_WAIT_INTERRUPT, 0);
        return 0;
    case BT_VMCALL:
        pvh_hypercall(b);
        bt_set_reg(b, UC_X86_REG_RIP, rip + s->len);
        return 0;
    case BT_MOV_CR: {
        static const int gprs[16] = {
            UC_X86_REG_RAX, UC_X86_REG_RCX, UC_X86_REG_RDX, UC_X86_REG_RBX,
            UC_X86_REG_RSP, UC_X86_REG_RBP, UC_X86_REG_RSI, UC_X86_REG_RDI,
            UC_X86_REG_R8, UC_X86_REG_R9, UC_X86_REG_R10, UC_X86_REG_R11,
            UC_X86_REG_R12, UC_X86_REG_R13, UC_X86_REG_R14, UC_X86_REG_R15,
        };
        int reg = cr4_write(s);
        if (reg >= 0 && (bt_reg(b, gprs[reg]) & ~cr4_valid_bits(b))) {
            memset(&b->exception, 0, sizeof(b->exception));
            b->exception.vector = 13;   /* #GP(0), as Xen for a reserved CR4 bit */
            b->exception.has_error = 1;
            return 0;
        }
        b->skip_once = s;               /* TCG does the write */
        return 0;
    }
    case BT_ICEBP:
        /* a #DB trap: the next rip, no DPL check, EXT in an error code on the way */
        bt_set_reg(b, UC_X86_REG_RIP, rip + s->len);
        memset(&b->exception, 0, sizeof(b->exception));
        b->exception.vector = 1;
        b->exception.insn_len = s->len;
        return 0;
    case BT_WRMSR: {
        uint64_t value = (uint32_t)bt_reg(b, UC_X86_REG_RAX) |
                         (uint64_t)(uint32_t)bt_reg(b, UC_X86_REG_RDX) << 32;
        uint32_t msr = (uint32_t)bt_reg(b, UC_X86_REG_RCX);
        if (bt_platform_msr(b, msr) ? bt_platform_wrmsr(b, msr, value) < 0 :
                                      hv_pvh_wrmsr(v, msr, value) < 0) {
            memset(&b->exception, 0, sizeof(b->exception));
            b->exception.vector = 13;   /* #GP(0), as Xen for a bad page or index */
            b->exception.has_error = 1;
            return 0;
        }
        bt_set_reg(b, UC_X86_REG_RIP, rip + s->len);
        return 0;
    }
    case BT_RDMSR: {
        uint32_t msr = (uint32_t)bt_reg(b, UC_X86_REG_RCX);
        uint64_t value = 0;
        if (bt_platform_rdmsr(b, msr, &value) < 0 && hv_pvh_rdmsr(v, msr, &value) < 0) {
            memset(&b->exception, 0, sizeof(b->exception));
            b->exception.vector = 13;
            b->exception.has_error = 1;
            return 0;
        }
        bt_set_reg(b, UC_X86_REG_RAX, (uint32_t)value);
        bt_set_reg(b, UC_X86_REG_RDX, value >> 32);
        bt_set_reg(b, UC_X86_REG_RIP, rip + s->len);
        return 0;
    }
    case BT_STI:
        bt_set_reg(b, UC_X86_REG_RFLAGS, rflags | RFLAGS_IF);
        bt_set_reg(b, UC_X86_REG_RIP, rip + s->len);
        return 0;
    case BT_POPF: {
        /* flags a ring-0 popf may change: CF PF AF ZF SF TF IF DF OF IOPL NT AC ID */
        const uint64_t mask = 0x1 | 0x4 | 0x10 | 0x40 | 0x80 | 0x100 | 0x200 | 0x400 | 0x800 |
                              0x3000 | 0x4000 | 0x40000 | 0x200000;
        uint64_t value = 0;
        struct bt_insn in;
        int width = decode_at(b, rip, &in) == 0 && in.opsize == 2 ? 2 : bt_code32(b) ? 4 : 8;
        if (bt_read_virt(b, rsp, &value, width) < 0) {
            b->skip_once = s;   /* let TCG run it and raise the #PF */
            return 0;
        }
        if (width == 2)
            value = (rflags & ~0xffffULL) | (value & 0xffff);
        bt_set_reg(b, UC_X86_REG_RFLAGS, ((rflags & ~mask) | (value & mask)) & ~RFLAGS_RF);
        bt_set_reg(b, UC_X86_REG_RSP, rsp + (uint64_t)width);
        bt_set_reg(b, UC_X86_REG_RIP, rip + s->len);
        return 0;
    }
    case BT_IRET: {
        uint64_t frame[5];          /* rip, cs, rflags, rsp, ss */
        struct bt_insn in;
        uint64_t cs = bt_reg(b, UC_X86_REG_CS), ss = bt_reg(b, UC_X86_REG_SS);
        /* the VMM does the plain case (iretq to ring 0, same segments) and the CPU,
         * from the VMM's page, an iretq to ring 3; TCG the rest */
        if (decode_at(b, rip, &in) < 0 || in.opsize != 8 ||
            bt_read_virt(b, rsp, frame, sizeof(frame)) < 0) {
            b->skip_once = s;
            return 0;
        }
        if ((frame[1] & 3) == 3 && (cs & 3) == 0) {
            if (bt_iret_to_user(b, frame) < 0)
                b->skip_once = s;
            return 0;
        }
        if ((frame[1] & 0xffff) != cs || (frame[4] & 0xffff) != ss) {
            b->skip_once = s;
            return 0;
        }
        bt_set_reg(b, UC_X86_REG_RFLAGS, (frame[2] & 0x3d7fd7ULL) | 0x2);
        bt_set_reg(b, UC_X86_REG_RSP, frame[3]);
        bt_set_reg(b, UC_X86_REG_RIP, frame[0]);
        return 0;
    }
    }
    return 0;
}

/* Deliver the next interrupt if the vCPU can take it now; otherwise the sti, popf and
 * iretq hooks stop the emulator as soon as it can. 0, or -1 with stop filled. */
static int deliver_interrupt(struct bt_vcpu *b, struct hv_stop *stop)
{
    struct hv_vcpu *v = b->v;
    int is_upcall, vector = hv_next_vector(v, &is_upcall);
    struct bt_event ev = { .vector = vector };
    uint64_t rip;
    uint8_t op;

    if (vector < 0 || !interrupts_on(b))
        return 0;
    /* Stopped right before a hlt (after sti, whose shadow would have let the hlt
     * run first): the hlt has happened and this interrupt is what wakes it. */
    rip = bt_reg(b, UC_X86_REG_RIP);
    if (bt_read_virt(b, rip, &op, 1) == 0 && op == 0xf4) {
        v->dom->counters.exits[HV_EXIT_HLT]++;
        bt_set_reg(b, UC_X86_REG_RIP, rip + 1);
    }
    if (bt_deliver(b, &ev, stop) < 0)
        return -1;
    hv_vector_taken(v, vector, is_upcall);
    return 0;
}

static int bt_flush_before_entry(struct hv_vcpu *v);

/* Caller holds the domain's guest lock. */
static int bt_run_locked(struct hv_vcpu *v, struct hv_stop *stop)
{
    struct bt_vcpu *b = bt_of(v);
    struct hv_domain *d = v->dom;
    struct hv_counters *c = &d->counters;
    uint64_t last_unexplained = ~0ULL;

    for (;;) {
        uint64_t rip;
        int kicked, stepping, tf_before = 0, entry;
        uc_err e;

        /* another vCPU of the domain waits: its turn first */
        if (hv_guest_lock_yield(d))
            b->slice_blocks = 0;
        b->slice_over = 0;
        if (b->nr_stale_frames)
            drop_stale_frames(b);
        if (b->tb_stale) {              /* stores our code may have missed */
            b->tb_stale = 0;
            bt_uc.ctl(b->uc, UC_CTL_TB_FLUSH_W);
            memset(b->code_frames, 0, b->frame_map_bytes);
        }
        if (v->context_pending && bt_pv_load_context(b, stop) < 0)
            return stop->reason;
        rip = bt_reg(b, UC_X86_REG_RIP);

        if (b->fatal) {
            *stop = b->fatal_stop;
            stop->rip = rip;    /* where the emulator stopped, at the instruction: a
                                 * TLB fill's read of it was the last synced rip's
                                 * (the patched Unicorn restores it on a fault only) */
            b->fatal = 0;
            return stop->reason;
        }
        if (__atomic_load_n(&d->shutting_down, __ATOMIC_ACQUIRE))
            return hv_stop_with(stop, HV_STOP_SHUTDOWN, d->shutdown_reason, rip, "shutdown");
        if (__atomic_exchange_n(&v->kicked, 0, __ATOMIC_SEQ_CST))
            return hv_stop_with(stop, HV_STOP_KICKED, 0, rip, "stopped by the toolstack");
        if (__atomic_load_n(&v->paused, __ATOMIC_ACQUIRE))
            hv_vcpu_park(v, HV_WAIT_UNPAUSE, 0);
        if (hv_vcpu_must_park(v))
            return HV_STOP_PARKED;
        if (b->retranslate_end) {
            bt_uc.ctl(b->uc, UC_CTL_TB_REMOVE_CACHE_W, b->retranslate_start, b->retranslate_end);
            b->retranslate_start = b->retranslate_end = 0;
        }
        if (b->stopped_at) {
            struct bt_site *s = b->stopped_at;
            b->stopped_at = NULL;
            if (s->addr == rip && emulate(b, s, stop) < 0)
                return stop->reason;
            continue;           /* the state changed: look again */
        }
        hv_events_flush(v);     /* events other threads raised: the guest is stopped */
        if (b->syscall_pending) {
            int sysenter = b->syscall_pending == 2;
            b->syscall_pending = 0;
            if (bt_pv_syscall(b, sysenter, stop) < 0)
                return stop->reason;
            continue;
        }
        if (b->pvh_syscall_pending) {
            b->pvh_syscall_pending = 0;
            if (pvh_syscall(b, stop) < 0)
                return stop->reason;
            continue;
        }
        if (b->exception.vector >= 0) {
            struct bt_event ev = b->exception;
            b->exception.vector = -1;
            if ((d->pv_model == HV_PV_XEN ? bt_pv_exception(b, &ev, stop) : bt_deliver(b, &ev, stop)) < 0)
                return stop->reason;
        }
        if ((d->pv_model == HV_PV_XEN ? bt_pv_events(b, stop) : deliver_interrupt(b, stop)) < 0)
            return stop->reason;

        /* Breakpoints or TF: one instruction at a time, an instruction breakpoint
         * checked first (bt_debug.c) */
        stepping = d->pv_model == HV_PV_XEN && bt_debug_stepping(b);
        if (stepping) {
            int db = bt_debug_before(b, stop);
            if (db < 0)
                return stop->reason;
            if (db > 0)
                continue;
            tf_before = (bt_reg(b, UC_X86_REG_RFLAGS) & RFLAGS_TF) != 0;
        }

        /* a kvm vCPU's twin (bt_twin.c) is done once the vCPU runs 64-bit code again */
        if (b->twin && !bt_code32(b))
            return BT_TWIN_BACK;
        entry = hv_vcpu_before_entry(v, bt_flush_before_entry);
        if (entry > 0)
            return HV_STOP_PARKED;
        if (entry < 0)
            return hv_stop_with(stop, HV_STOP_ERROR, 0, rip, "cannot flush the vCPU's TLB");
        /* A kick that came while we were outside the emulator is counted here, as
         * KVM counts the KVM_RUN it cuts short (immediate_exit). */
        pthread_mutex_lock(&b->kick_lock);
        kicked = b->kick_pending;
        b->kick_pending = 0;
        if (!kicked) {
            b->in_emu = 1;
            b->emu_gen++;
            b->stop_asked = 0;  /* a kick answered on another path */
        }
        pthread_mutex_unlock(&b->kick_lock);
        if (kicked) {
            __atomic_store_n(&v->in_guest, 0, __ATOMIC_SEQ_CST);
            c->exits[HV_EXIT_INTR]++;
            continue;           /* something changed since the checks above */
        }

        rip = bt_reg(b, UC_X86_REG_RIP);
        b->stepping = stepping;
        e = bt_uc.emu_start(b->uc, rip, 0, 0, stepping ? 1 : 0);

        pthread_mutex_lock(&b->kick_lock);
        b->in_emu = 0;
        kicked = b->kick_pending;   /* left set: counted on the way back in */
        /* A uc_kick that landed after the run ended would stop the next emu_start at
         * its first block, a ring change's (bt_cpu.c) too: drop it. None comes now
         * that in_emu is 0. */
        if (bt_uc.kick_take)
            bt_uc.kick_take(b->uc);
        pthread_mutex_unlock(&b->kick_lock);
        __atomic_store_n(&v->in_guest, 0, __ATOMIC_SEQ_CST);

        switch (e) {
        case UC_ERR_OK:
            break;
        case UC_ERR_EXCEPTION:
            bt_page_fault_event(b, &b->exception);
            continue;
        case UC_ERR_INSN_INVALID:
            memset(&b->exception, 0, sizeof(b->exception));
            b->exception.vector = 6;    /* #UD at the instruction */
            continue;
        default:
            if (b->fatal)
                continue;
            return hv_stop_with(stop, HV_STOP_ERROR, e, bt_reg(b, UC_X86_REG_RIP),
                                "Unicorn stopped: %s", bt_uc.strerror(e));
        }
        if (stepping) {
            if (bt_debug_after(b, rip, tf_before, stop) < 0)
                return stop->reason;
            continue;           /* each step ends where it should: nothing to explain */
        }
        /* A stop nobody asked for: TCG ran a hlt we had no hook on yet, or QEMU's own
         * exception latch turned a fault into a silent halt. */
        if (!b->stopped_at && b->exception.vector < 0 && !b->fatal && !b->retranslate_end &&
            !b->tb_stale && !b->nr_stale_frames &&
            !b->syscall_pending && !b->pvh_syscall_pending && !b->slice_over &&
            !kicked && !__atomic_load_n(&d->shutting_down, __ATOMIC_ACQUIRE) &&
            !__atomic_load_n(&v->kicked, __ATOMIC_ACQUIRE) &&
            !__atomic_load_n(&v->paused, __ATOMIC_ACQUIRE) && !deliverable(b)) {
            uint64_t now = bt_reg(b, UC_X86_REG_RIP);
            uint8_t prev;
            if (bt_read_virt(b, now - 1, &prev, 1) == 0 && prev == 0xf4) {
                c->exits[HV_EXIT_HLT]++;
                if (!interrupts_on(b))
                    return hv_stop_with(stop, HV_STOP_FAULT, BT_HLT, now - 1,
                                        "hlt with interrupts disabled: nothing can wake the vCPU");
                c->blocks++;
                hv_vcpu_park(v, HV_WAIT_INTERRUPT, 0);
            } else if (now == last_unexplained) {
                /* twice at the same instruction: QEMU's latch swallowed its fault */
                fault_of_instruction(b, now, &b->exception);
            }
            last_unexplained = now;
        } else {
            last_unexplained = ~0ULL;
        }
    }
}

/* Another vCPU changed page tables or types (hv_vcpu_flush_others). Through the ops: a
 * kvm vCPU's twin notes that KVM's translations need the flush too. */
static int bt_flush_before_entry(struct hv_vcpu *v)
{
    return v->ops->flush_tlb(v);
}

/* One vCPU of a domain runs guest code at a time (the guest lock, vcpu.c). */
static int bt_run(struct hv_vcpu *v, struct hv_stop *stop)
{
    int rc;
    hv_guest_lock(v->dom);
    bt_of(v)->run_thread = __builtin_thread_pointer();
    rc = bt_run_locked(v, stop);
    v->tlb_page.gen = NULL;             /* TCG's TLB answers only inside a run */
    bt_of(v)->run_thread = NULL;
    hv_guest_unlock(v->dom);
    return rc;
}

const struct hv_engine_impl hv_bt_engine = {
    .name = "bt",
    .available = bt_available,
    .create_vm = bt_create_vm,
    .destroy_vm = bt_destroy_vm,
    .vcpu_create = bt_vcpu_create,
    .vcpu_destroy = bt_vcpu_destroy,
    .set_boot_state = bt_set_boot_state,
    .run = bt_run,
    .guest_atomics = 0,             /* TCG runs locked instructions as plain ones */
    .guest_fences = 0,              /* ... and emits no host fence for them or mfence */
    .cr4_fsgsbase = 1,              /* TCG honours CR4.FSGSBASE (bt_pv.c) */
};

int hv_bt_insn_length(const uint8_t *code, int avail, int *kind)
{
    struct bt_insn in;
    if (bt_decode(code, avail, &in) < 0)
        return -1;
    if (kind)
        *kind = in.kind;
    return in.len;
}

int hv_bt_insn_length32(const uint8_t *code, int avail, int *kind)
{
    struct bt_insn in;
    if (bt_decode_mode(code, avail, &in, 1) < 0)
        return -1;
    if (kind)
        *kind = in.kind;
    return in.len;
}
