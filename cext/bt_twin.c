/*
 * bt_twin.c - a Unicorn twin of a kvm vCPU: runs the vCPU's compat-mode code, which this
 * KVM-PVM host cannot run in ring 3 (docs/engines.md), with the bt engine's own vCPU code.
 *
 * The twin is a bt vCPU (bt_vcpu_open) of the same domain: the same guest RAM, the same
 * hypervisor region, the same hooks, and Xen's PV model through bt_pv.c, which reads and
 * writes the one struct pv_vcpu both engines share. kvm.c moves the vCPU here when its
 * CS becomes a compat code selector and takes it back when hv_twin_run says it runs
 * 64-bit code again (the twin's run loop checks before every entry, bt.c). What moves
 * each way: the model's registers (GPRs, rip, rflags, CS, SS, the FS and GS bases, the
 * %gs selector), DS, ES and FS, cr3, and the x87/SSE state. The control state Xen's
 * model keeps (CR0.TS, CR4, XCR0, the debug registers, the LDT) is loaded from v->pv.
 * The YMM upper halves stay in KVM: TCG runs no AVX, and a legacy SSE instruction
 * leaves them alone on the CPU too.
 */
#include <linux/kvm.h>
#include <stdlib.h>
#include <string.h>

#include "bt.h"

enum {                              /* uc_x86_reg ids of the x87 and SSE state */
    UC_X86_REG_FPSW = 31, UC_X86_REG_FP0 = 82, UC_X86_REG_XMM0 = 122,
    UC_X86_REG_FPTAG = 247, UC_X86_REG_FIP = 254, UC_X86_REG_FDP = 256,
    UC_X86_REG_FOP = 258, UC_X86_REG_FS = 32,
};

static struct bt_vcpu *twin_of(struct hv_vcpu *v)
{
    return v->engine_priv;
}

/* The state no transfer changes: long mode with paging, Xen's GDT for this vCPU. */
static int twin_create(struct hv_vcpu *v, char *err, int err_len)
{
    struct bt_vcpu *b;
    uc_x86_mmr gdtr = { .base = PV_VCPU_VA(v->id, PV_GDT_VA), .limit = PV_GDT_LIMIT }, idtr = { 0 };
    uc_x86_msr efer = { .rid = 0xc0000080, .value = 0xd00 };   /* NXE LMA LME */
    uint16_t cs = FLAT_KERNEL_CS, null = 0;

    if (bt_vcpu_open(v, err, err_len) < 0)
        return -1;
    b = twin_of(v);
    bt_set_reg(b, UC_X86_REG_CR4, PV_CR4_VISIBLE);
    if (bt_uc.reg_write(b->uc, UC_X86_REG_MSR, &efer) != UC_ERR_OK ||
        bt_uc.reg_write(b->uc, UC_X86_REG_GDTR, &gdtr) != UC_ERR_OK ||
        bt_uc.reg_write(b->uc, UC_X86_REG_IDTR, &idtr) != UC_ERR_OK) {
        hv_set_error(err, err_len, "Unicorn will not take the twin's control state");
        bt_vcpu_destroy(v);
        return -1;
    }
    bt_set_reg(b, UC_X86_REG_CR0, PV_CR0);
    bt_uc.reg_write(b->uc, UC_X86_REG_CS, &cs);     /* 64-bit mode: the selector alone */
    bt_uc.reg_write(b->uc, UC_X86_REG_DS, &null);
    bt_uc.reg_write(b->uc, UC_X86_REG_ES, &null);
    b->uc_code_bits = 1;                            /* 64-bit code, as bt_pv_boot */
    b->pv_ss = FLAT_KERNEL_SS;
    b->twin = 1;
    return 0;
}

/* struct kvm_fpu holds ST(0)..ST(7) in stack order and the abridged tag word (a bit per
 * physical register, 1 = valid); Unicorn FP0..FP7 are the physical registers and its tag
 * word is the full one (11 = empty). TOP, in FSW, maps one onto the other. */
static void fpu_to_twin(struct bt_vcpu *b, const struct kvm_fpu *f)
{
    unsigned top = (f->fsw >> 11) & 7;
    uint16_t tag = 0, fsw = f->fsw, fcw = f->fcw, fop = f->last_opcode;
    uint32_t mxcsr = f->mxcsr;
    uint64_t fip = f->last_ip, fdp = f->last_dp;

    for (unsigned p = 0; p < 8; p++)
        if (!((f->ftwx >> p) & 1))
            tag |= (uint16_t)(3u << (2 * p));
    bt_uc.reg_write(b->uc, UC_X86_REG_FPCW, &fcw);
    bt_uc.reg_write(b->uc, UC_X86_REG_FPSW, &fsw);
    bt_uc.reg_write(b->uc, UC_X86_REG_FPTAG, &tag);
    for (unsigned i = 0; i < 8; i++)
        bt_uc.reg_write(b->uc, UC_X86_REG_FP0 + (int)((top + i) & 7), f->fpr[i]);
    for (int i = 0; i < 16; i++)
        bt_uc.reg_write(b->uc, UC_X86_REG_XMM0 + i, f->xmm[i]);
    bt_uc.reg_write(b->uc, UC_X86_REG_MXCSR, &mxcsr);
    bt_uc.reg_write(b->uc, UC_X86_REG_FOP, &fop);
    bt_uc.reg_write(b->uc, UC_X86_REG_FIP, &fip);
    bt_uc.reg_write(b->uc, UC_X86_REG_FDP, &fdp);
}

static void fpu_from_twin(struct bt_vcpu *b, struct kvm_fpu *f)
{
    uint16_t tag = 0, fsw = 0, fcw = 0, fop = 0;
    uint32_t mxcsr = 0;
    uint64_t fip = 0, fdp = 0;
    unsigned top;

    memset(f, 0, sizeof(*f));
    bt_uc.reg_read(b->uc, UC_X86_REG_FPCW, &fcw);
    bt_uc.reg_read(b->uc, UC_X86_REG_FPSW, &fsw);
    bt_uc.reg_read(b->uc, UC_X86_REG_FPTAG, &tag);
    top = (fsw >> 11) & 7;
    for (unsigned i = 0; i < 8; i++)
        bt_uc.reg_read(b->uc, UC_X86_REG_FP0 + (int)((top + i) & 7), f->fpr[i]);
    for (unsigned p = 0; p < 8; p++)
        if (((tag >> (2 * p)) & 3) != 3)
            f->ftwx |= (uint8_t)(1u << p);
    for (int i = 0; i < 16; i++)
        bt_uc.reg_read(b->uc, UC_X86_REG_XMM0 + i, f->xmm[i]);
    bt_uc.reg_read(b->uc, UC_X86_REG_MXCSR, &mxcsr);
    bt_uc.reg_read(b->uc, UC_X86_REG_FOP, &fop);
    bt_uc.reg_read(b->uc, UC_X86_REG_FIP, &fip);
    bt_uc.reg_read(b->uc, UC_X86_REG_FDP, &fdp);
    f->fcw = fcw;
    f->fsw = fsw;
    f->last_opcode = fop;
    f->mxcsr = mxcsr;
    f->last_ip = fip;
    f->last_dp = fdp;
}

/* The frames the twin translated code from, as they were when it last left: up to
 * TWIN_CODE_FRAMES of them (a compat program's hot pages; more and the blocks all go
 * each time). Dropping every block costs about 25 us here, comparing a few pages far
 * less. */
#define TWIN_CODE_FRAMES 16
struct bt_twin_code {
    int n;                              /* -1: nothing kept */
    uint64_t frame[TWIN_CODE_FRAMES];
    uint8_t bytes[TWIN_CODE_FRAMES][4096];
};

static void keep_code(struct bt_vcpu *b)
{
    struct bt_twin_code *c = b->twin_code;
    struct hv_domain *d = b->v->dom;

    if (!c && !(c = b->twin_code = malloc(sizeof(*c))))
        return;
    c->n = 0;
    for (uint64_t i = 0; i < b->frame_map_bytes; i++) {
        if (!b->code_frames[i])
            continue;
        for (int bit = 0; bit < 8; bit++) {
            uint64_t frame = i * 8 + (uint64_t)bit;
            if (!((b->code_frames[i] >> bit) & 1))
                continue;
            if (c->n == TWIN_CODE_FRAMES || !hv_gpa_valid(d, frame * 4096, 4096)) {
                c->n = -1;
                return;
            }
            c->frame[c->n] = frame;
            memcpy(c->bytes[c->n++], d->ram + frame * 4096, 4096);
        }
    }
}

static int code_unchanged(struct bt_vcpu *b)
{
    const struct bt_twin_code *c = b->twin_code;

    if (!c || c->n < 0)
        return 0;
    for (int i = 0; i < c->n; i++)
        if (memcmp(c->bytes[i], b->v->dom->ram + c->frame[i] * 4096, 4096))
            return 0;
    return 1;
}

int hv_twin_enter(struct hv_vcpu *v, const struct pv_regs *r, const struct hv_twin_segs *segs,
                  uint64_t cr3, const struct kvm_fpu *fpu, char *err, int err_len)
{
    struct bt_vcpu *b;
    int rc = -1;

    /* Under the domain's guest lock, as the twins run: another vCPU's twin looks at this
     * one's translated code (bt.c, others_note_written) and must not find it half made */
    hv_guest_lock(v->dom);
    if (!twin_of(v) && twin_create(v, err, err_len) < 0)
        goto out;
    b = twin_of(v);
    /* nothing of the last visit is left to do: the vCPU went on in KVM since */
    b->exception.vector = -1;
    b->stopped_at = b->skip_once = NULL;
    b->syscall_pending = b->pvh_syscall_pending = 0;
    b->stepping = b->fatal = b->slice_over = 0;
    b->db_hits = b->db_shadow = 0;
    b->db_shadow_armed = 0;
    b->soft_int_end = ~0ULL;
    /* The guest ran under KVM meanwhile and may have written over code this Unicorn
     * translated (a new process in the same frames): unless its frames hold what they
     * held when the twin left, every block goes. The TLB goes in any case (the tables
     * may have changed too; a block is found again through it). */
    if (!code_unchanged(b)) {
        bt_uc.ctl(b->uc, UC_CTL_TB_FLUSH_W);
        memset(b->code_frames, 0, b->frame_map_bytes);
        memset(b->written_frames, 0, b->frame_map_bytes);
        b->nr_stale_frames = 0;
        b->tb_stale = 0;
        b->retranslate_start = b->retranslate_end = 0;
    }
    bt_write_cr3(b, cr3);      /* and the copy bt_cr3 answers the walks from */
    bt_uc.ctl(b->uc, UC_CTL_TLB_FLUSH_W);
    /* data selectors first: a selector write loads its descriptor, and the FS base
     * the model keeps goes over it (bt_pv_set_regs) */
    bt_uc.reg_write(b->uc, UC_X86_REG_DS, &segs->ds);
    bt_uc.reg_write(b->uc, UC_X86_REG_ES, &segs->es);
    bt_uc.reg_write(b->uc, UC_X86_REG_FS, &segs->fs);
    v->pv.hw_dirty = 1;                 /* CR0.TS, CR4, XCR0, the DRs and the LDT */
    bt_pv_set_regs(b, r);
    fpu_to_twin(b, fpu);
    if (b->fatal) {                     /* Unicorn did not switch to CS's mode */
        hv_set_error(err, err_len, "%s", b->fatal_stop.message);
        b->fatal = 0;
        goto out;
    }
    rc = 0;
out:
    hv_guest_unlock(v->dom);
    return rc;
}

int hv_twin_run(struct hv_vcpu *v, struct hv_stop *stop)
{
    return hv_bt_engine.run(v, stop);
}

void hv_twin_leave(struct hv_vcpu *v, struct pv_regs *r, struct hv_twin_segs *segs,
                   uint64_t *cr3, struct kvm_fpu *fpu)
{
    struct bt_vcpu *b = twin_of(v);

    hv_guest_lock(v->dom);
    bt_pv_get_regs(b, r);
    segs->ds = (uint16_t)bt_reg(b, UC_X86_REG_DS);
    segs->es = (uint16_t)bt_reg(b, UC_X86_REG_ES);
    segs->fs = (uint16_t)bt_reg(b, UC_X86_REG_FS);
    *cr3 = bt_cr3(b);
    fpu_from_twin(b, fpu);
    keep_code(b);
    hv_guest_unlock(v->dom);
}

void hv_twin_kick(struct hv_vcpu *v)
{
    bt_vcpu_ops.kick(v);                /* bt's kick: stops the twin at its next block */
}

void hv_twin_destroy(struct hv_vcpu *v)
{
    if (twin_of(v))
        bt_vcpu_destroy(v);
}

const struct hv_engine_ops *hv_twin_ops(void)
{
    return &bt_vcpu_ops;
}
