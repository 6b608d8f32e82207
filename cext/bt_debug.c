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
 * pv_inject_DB does (bt_pv_debug_exception). Which breakpoints an access or rip hits is
 * the PV model's (pv_debug.c, which kvm uses too). I/O breakpoints are the PV model's
 * own (pv_emul.c): the guest's port I/O is always emulated.
 */
#include <string.h>

#include "bt.h"

#define DR6_BS      (1u << 14)

static void on_access(uc_engine *uc, int type, uint64_t va, int size, int64_t value, void *user)
{
    struct bt_vcpu *b = user;
    (void)uc;
    (void)value;
    if (!b->tramp_active && !b->kernel_view)
        b->db_hits |= pv_debug_data_hits(&b->v->pv, va, (uint64_t)size, type == UC_MEM_WRITE);
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

int bt_debug_stepping_flags(struct bt_vcpu *b, uint64_t rflags)
{
    const struct pv_vcpu *p = &b->v->pv;
    /* no L0-3/G0-3 enable bit in DR7: no breakpoint at all (every bounce asks) */
    int armed = (p->dr[7] & 0xff) != 0, data;

    if (!armed && !b->db_mem_hook && !b->db_shadow_armed)
        return (rflags & RFLAGS_TF) != 0;
    data = armed && pv_debug_armed(p, 1);

    set_access_hook(b, data);
    return data || (armed && pv_debug_armed(p, 0)) || b->db_shadow_armed ||
           (rflags & RFLAGS_TF);
}

int bt_debug_stepping(struct bt_vcpu *b)
{
    return bt_debug_stepping_flags(b, bt_reg(b, UC_X86_REG_RFLAGS));
}

int bt_debug_before(struct bt_vcpu *b, struct hv_stop *stop)
{
    uint64_t rip = bt_reg(b, UC_X86_REG_RIP), rflags = bt_reg(b, UC_X86_REG_RFLAGS);
    uint32_t hits;

    b->db_hits = 0;
    if (rflags & RFLAGS_RF) {
        /* the handler's iret asked for this instruction to run once unbroken; the CPU
         * clears RF when it completes, which nothing in TCG does for us */
        bt_set_reg(b, UC_X86_REG_RFLAGS, rflags & ~RFLAGS_RF);
        return 0;
    }
    hits = pv_debug_exec_hits(&b->v->pv, rip);
    if (!hits)
        return 0;
    return bt_pv_debug_exception(b, hits, stop) < 0 ? -1 : 1;
}

int bt_debug_after(struct bt_vcpu *b, uint64_t rip_before, int tf_before, struct hv_stop *stop)
{
    uint32_t bits = b->db_hits;

    b->db_hits = 0;
    if (b->syscall_pending && b->exception.vector == 1 && !b->exception.soft)
        b->exception.vector = -1;       /* TCG's single-step trap after a `syscall`: in
                                         * Xen it comes at its entry point, and do_debug
                                         * drops it */
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
        (bt_reg(b, UC_X86_REG_RIP) == rip_before && !bits))
        return 0;                       /* it did not run (yet); an iteration of a rep
                                         * string instruction that hit one did */
    if (tf_before)
        bits |= DR6_BS;
    if (b->db_shadow_armed) {
        bits |= b->db_shadow;
        b->db_shadow = 0;
        b->db_shadow_armed = 0;
    }
    return bits ? bt_pv_debug_exception(b, bits, stop) : 0;
}
