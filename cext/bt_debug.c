/*
 * bt_debug.c - the debug registers and single-step of Xen's PV model on the bt engine.
 *
 * Unicorn takes DR0-7 but never turns them into #DB, so while the guest has a code or
 * data breakpoint enabled in its virtual DR7, or RFLAGS.TF set, or a #DB waits in a
 * mov-SS shadow, the run loop runs one instruction at a time and this file plays the
 * CPU's part around each (SDM vol. 3 ch. 18):
 *   - before it: an instruction breakpoint at rip is a fault (rip stays), unless
 *     RFLAGS.RF is set, which lets the instruction run once and is then cleared;
 *   - during it: a memory hook collects the data breakpoints the accesses overlap
 *     (R/W 01 writes, 11 reads and writes; LEN 1, 2, 4 or 8 bytes, aligned down);
 *   - after it: the data hits and, if TF was set before it, BS make a #DB trap (rip
 *     past the instruction).
 * The #DB goes to the guest's trap table with the bits in its virtual DR6, as Xen's
 * pv_inject_DB does (bt_pv_debug_exception). I/O breakpoints are the PV model's own
 * (pv_emul.c): the guest's port I/O is always emulated.
 */
#include <string.h>

#include "bt.h"

#define DR6_BS      (1u << 14)
#define DR7_RW_EXEC 0
#define DR7_RW_IO   2

static int dr7_enabled(uint64_t dr7, int i)
{
    return (dr7 >> (2 * i)) & 3;
}

static unsigned dr7_rw(uint64_t dr7, int i)
{
    return (dr7 >> (16 + 4 * i)) & 3;
}

/* LEN encodings 00, 01, 10, 11: 1, 2, 8, 4 bytes */
static uint64_t dr7_len(uint64_t dr7, int i)
{
    static const uint8_t bytes[4] = { 1, 2, 8, 4 };
    return bytes[(dr7 >> (18 + 4 * i)) & 3];
}

/* The enabled breakpoints of one kind: DR_EXEC (R/W 00) or data (01, 11). */
static int armed(const struct pv_vcpu *p, int data)
{
    for (int i = 0; i < 4; i++) {
        unsigned rw = dr7_rw(p->dr[7], i);
        if (dr7_enabled(p->dr[7], i) && rw != DR7_RW_IO && (rw != DR7_RW_EXEC) == data)
            return 1;
    }
    return 0;
}

uint32_t bt_debug_data_hits(struct bt_vcpu *b, uint64_t va, int size, int write)
{
    const struct pv_vcpu *p = &b->v->pv;
    uint32_t hits = 0;

    for (int i = 0; i < 4; i++) {
        unsigned rw = dr7_rw(p->dr[7], i);
        uint64_t len = dr7_len(p->dr[7], i), start = p->dr[i] & ~(len - 1);
        if (!dr7_enabled(p->dr[7], i) || rw == DR7_RW_EXEC || rw == DR7_RW_IO ||
            (rw == 1 && !write))
            continue;
        if (va < start + len && va + (uint64_t)size > start)
            hits |= 1u << i;
    }
    return hits;
}

static void on_access(uc_engine *uc, int type, uint64_t va, int size, int64_t value, void *user)
{
    struct bt_vcpu *b = user;
    (void)uc;
    (void)value;
    if (!b->tramp_active && !b->kernel_view)
        b->db_hits |= bt_debug_data_hits(b, va, size, type == UC_MEM_WRITE);
}

/* The access hook exists only while data breakpoints are armed: it sends every load
 * and store through Unicorn's slow path. Translated code is dropped when it comes or
 * goes, so no block keeps the other choice. */
static void set_access_hook(struct bt_vcpu *b, int on)
{
    if (on == (b->db_mem_hook != 0))
        return;
    if (on) {
        uc_hook hh = 0;
        if (bt_uc.hook_add(b->uc, &hh, UC_HOOK_MEM_READ | UC_HOOK_MEM_WRITE, (void *)on_access,
                           b, 1, 0) == UC_ERR_OK)
            b->db_mem_hook = hh;
    } else {
        bt_uc.hook_del(b->uc, b->db_mem_hook);
        b->db_mem_hook = 0;
    }
    bt_uc.ctl(b->uc, UC_CTL_TB_FLUSH_W);
}

int bt_debug_stepping(struct bt_vcpu *b)
{
    const struct pv_vcpu *p = &b->v->pv;
    int data = armed(p, 1);

    set_access_hook(b, data);
    return data || armed(p, 0) || b->db_shadow_armed ||
           (bt_reg(b, UC_X86_REG_RFLAGS) & RFLAGS_TF);
}

int bt_debug_before(struct bt_vcpu *b, struct hv_stop *stop)
{
    const struct pv_vcpu *p = &b->v->pv;
    uint64_t rip = bt_reg(b, UC_X86_REG_RIP), rflags = bt_reg(b, UC_X86_REG_RFLAGS);
    uint32_t hits = 0;

    b->db_hits = 0;
    if (rflags & RFLAGS_RF) {
        /* the handler's iret asked for this instruction to run once unbroken; the CPU
         * clears RF when it completes, which nothing in TCG does for us */
        bt_set_reg(b, UC_X86_REG_RFLAGS, rflags & ~RFLAGS_RF);
        return 0;
    }
    for (int i = 0; i < 4; i++)
        if (dr7_enabled(p->dr[7], i) && dr7_rw(p->dr[7], i) == DR7_RW_EXEC && p->dr[i] == rip)
            hits |= 1u << i;
    if (!hits)
        return 0;
    return bt_pv_debug_exception(b, hits, stop) < 0 ? -1 : 1;
}

int bt_debug_after(struct bt_vcpu *b, uint64_t rip_before, int tf_before, struct hv_stop *stop)
{
    uint32_t bits = b->db_hits;

    b->db_hits = 0;
    if (b->exception.vector == 1 && !b->exception.soft && tf_before) {
        /* TCG's own single-step trap, which knows nothing of the guest's DR6: ours */
        b->exception.vector = -1;
        b->db_shadow_armed = 0;
        return bt_pv_debug_exception(b, bits | DR6_BS | b->db_shadow, stop);
    }
    if (b->exception.vector >= 0 || b->syscall_pending) {
        /* The instruction entered the hypervisor (a fault, int n, syscall): its data
         * hits are lost with it. A #DB held by a mov-SS shadow would arrive on the
         * CPU's first instruction in Xen; Xen's do_debug ignores a #DB from its own
         * context (XSA-260, XSA-265), and so do we. */
        b->db_shadow = 0;
        b->db_shadow_armed = 0;
        return 0;
    }
    if (b->stopped_at || b->retranslate_end || b->fatal ||
        bt_reg(b, UC_X86_REG_RIP) == rip_before)
        return 0;                       /* it did not run (yet) */
    if (tf_before)
        bits |= DR6_BS;
    if (b->db_shadow_armed) {
        bits |= b->db_shadow;
        b->db_shadow = 0;
        b->db_shadow_armed = 0;
    }
    return bits ? bt_pv_debug_exception(b, bits, stop) : 0;
}
