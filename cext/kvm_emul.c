/*
 * kvm_emul.c - the few ring-0 instructions this host's KVM cannot emulate.
 *
 * On this KVM-PVM host a PVH guest's ring-0 code runs in KVM's instruction emulator
 * (PVM-HOST.md), which gives up on some instructions with KVM_EXIT_INTERNAL_ERROR
 * (suberror KVM_INTERNAL_ERROR_EMULATION). kvm.c calls hv_kvm_emulate() then; we fetch
 * the bytes at RIP through the guest's page tables, decode only what we know, and do
 * what the CPU would:
 *   int3            #BP, a trap: the frame's RIP is the next instruction
 *   fnop            #NM if CR0.EM or CR0.TS; #MF if an unmasked x87 exception is
 *                   pending (FSW.ES) and CR0.NE; otherwise nothing
 *   cmpxchg16b m128 #GP(0) if m128 is not 16-byte aligned; else compare RDX:RAX with
 *                   it, store RCX:RBX (ZF=1) or load it into RDX:RAX (ZF=0)
 * Exceptions are delivered through the guest's IDT by writing the frame as the CPU
 * does (64-bit mode, CPL 0, same code segment, IST honoured). Anything else is left to
 * the caller, which stops the domain with the bytes we could read.
 */
#include <errno.h>
#include <linux/kvm.h>
#include <stdio.h>
#include <string.h>
#include <sys/ioctl.h>

#include "hv.h"

#define RFLAGS_ZF   (1ULL << 6)
#define RFLAGS_TF   (1ULL << 8)
#define RFLAGS_IF   (1ULL << 9)
#define RFLAGS_NT   (1ULL << 14)
#define RFLAGS_RF   (1ULL << 16)
#define RFLAGS_VM   (1ULL << 17)
#define CR0_MP      (1ULL << 1)
#define CR0_EM      (1ULL << 2)
#define CR0_TS      (1ULL << 3)
#define CR0_NE      (1ULL << 5)
#define EFER_LMA    (1ULL << 10)
#define CR4_VMXE    (1ULL << 13)
#define CR4_OSXSAVE (1ULL << 18)

/* kvm_regs in the CPU's register-number order (rax rcx rdx rbx rsp rbp rsi rdi r8..) */
static uint64_t *gpr(struct kvm_regs *r, unsigned n)
{
    uint64_t *map[16] = { &r->rax, &r->rcx, &r->rdx, &r->rbx, &r->rsp, &r->rbp, &r->rsi,
                          &r->rdi, &r->r8, &r->r9, &r->r10, &r->r11, &r->r12, &r->r13,
                          &r->r14, &r->r15 };
    return map[n & 15];
}

/* Write the sregs a delivery changed back: through sync regs where the vCPU syncs
 * them, else with KVM_SET_SREGS. */
static int sregs_changed(struct hv_vcpu *v, char *why, int why_len)
{
    if (v->run->kvm_valid_regs & KVM_SYNC_X86_SREGS) {
        v->run->kvm_dirty_regs |= KVM_SYNC_X86_SREGS;
        return 0;
    }
    if (ioctl(v->fd, KVM_SET_SREGS, &v->run->s.regs.sregs) < 0) {
        hv_set_error(why, why_len, "KVM_SET_SREGS: %s", strerror(errno));
        return -1;
    }
    return 0;
}

/* The code segment a gate names: a present, non-conforming 64-bit code segment in the
 * GDT whose DPL is not above the current ring (the ring the handler runs in). */
static int gate_code_segment(struct hv_vcpu *v, uint16_t sel, struct kvm_segment *cs,
                             char *why, int why_len)
{
    struct kvm_sregs *s = &v->run->s.regs.sregs;
    uint64_t desc;

    if ((sel & 4) || (sel & ~7) == 0 || (uint64_t)(sel & ~7) + 7 > s->gdt.limit ||
        hv_copy_from_guest(v, &desc, s->gdt.base + (sel & ~7), 8) < 0) {
        hv_set_error(why, why_len, "gate selector %#x: not a GDT entry we can read", sel);
        return -1;
    }
    unsigned type = (desc >> 40) & 0xf, dpl = (desc >> 45) & 3;
    if (!((desc >> 44) & 1) || !(type & 8) || (type & 4) || !((desc >> 47) & 1) ||
        !((desc >> 53) & 1) || dpl > s->cs.dpl) {
        hv_set_error(why, why_len, "gate selector %#x: descriptor %#llx is not a present "
                     "64-bit code segment for this ring (not emulated)", sel,
                     (unsigned long long)desc);
        return -1;
    }
    memset(cs, 0, sizeof(*cs));
    cs->selector = (uint16_t)((sel & ~3) | dpl);
    cs->limit = 0xffffffff;
    cs->type = (uint8_t)(type | 1);     /* accessed */
    cs->present = 1;
    cs->s = 1;
    cs->dpl = (uint8_t)dpl;
    cs->l = 1;
    cs->g = 1;
    return 0;
}

/* Deliver `vector` through the guest's 64-bit IDT as the CPU does in IA-32e mode, from
 * ring 0 or from ring 3 (then on the TSS's RSP0, with the user's SS:RSP in the frame
 * and a NULL SS after); `rip` is the frame's return address, regs->rip the
 * instruction a fault is reported at. `soft`: int n / int3, which the caller checked
 * against the gate's DPL. 0 on success, -1 with `why` filled when we cannot do it as
 * the CPU would. */
static int deliver(struct hv_vcpu *v, unsigned vector, int has_err, uint64_t err,
                   uint64_t rip, int fault, int soft, char *why, int why_len)
{
    struct kvm_regs *regs = &v->run->s.regs.regs;
    struct kvm_sregs *s = &v->run->s.regs.sregs;
    struct kvm_segment new_cs;
    uint8_t gate[16];
    uint64_t frame[6], rsp;
    unsigned cpl = s->cs.dpl;
    int n = 0, same_cs;

    if (!(s->efer & EFER_LMA) || (cpl == 0 && !s->cs.l)) {
        hv_set_error(why, why_len, "vector %u outside long mode or in 32-bit ring 0 is not "
                     "delivered", vector);
        return -1;
    }
    /* a bad gate raises #GP/#NP with the IDT's error code (EXT unless software) */
    uint64_t idt_err = (uint64_t)vector << 3 | 2 | (soft ? 0 : 1);
    int nested = vector == 13 || vector == 11 || vector == 10 || vector == 8;
    if (vector * 16 + 15 > s->idt.limit) {
        if (nested)
            goto nested;
        return deliver(v, 13, 1, idt_err, regs->rip, 1, 0, why, why_len);
    }
    if (hv_copy_from_guest(v, gate, s->idt.base + vector * 16, 16) < 0) {
        hv_set_error(why, why_len, "vector %u: IDT entry unreadable", vector);
        return -1;
    }
    unsigned type = gate[5] & 0xf, ist = gate[4] & 7;
    uint16_t sel = (uint16_t)(gate[2] | gate[3] << 8);
    uint64_t target = (uint64_t)gate[0] | (uint64_t)gate[1] << 8 | (uint64_t)gate[6] << 16 |
                      (uint64_t)gate[7] << 24 | (uint64_t)gate[8] << 32 |
                      (uint64_t)gate[9] << 40 | (uint64_t)gate[10] << 48 |
                      (uint64_t)gate[11] << 56;
    if (type != 0xe && type != 0xf) {
        if (nested)
            goto nested;
        return deliver(v, 13, 1, idt_err, regs->rip, 1, 0, why, why_len);
    }
    if (!(gate[5] & 0x80)) {
        if (nested)
            goto nested;
        return deliver(v, 11, 1, idt_err, regs->rip, 1, 0, why, why_len);
    }
    same_cs = cpl == 0 && (sel & ~3) == (s->cs.selector & ~3);
    if (same_cs)
        new_cs = s->cs;
    else if (gate_code_segment(v, sel, &new_cs, why, why_len) < 0)
        return -1;
    /* the stack: the gate's IST slot, else the TSS's RSP for a more privileged ring;
     * a slot beyond the TSS's limit is #TS(TSS) */
    rsp = regs->rsp;
    if (ist || new_cs.dpl < cpl) {
        uint32_t at = ist ? 36 + (ist - 1) * 8 : 4 + 8 * new_cs.dpl;
        if (at + 7 > s->tr.limit) {
            if (nested)
                goto nested;
            return deliver(v, 10, 1, (s->tr.selector & ~3) | (soft ? 0 : 1), regs->rip, 1, 0,
                           why, why_len);
        }
        if (hv_copy_from_guest(v, &rsp, s->tr.base + at, 8) < 0) {
            hv_set_error(why, why_len, "vector %u: cannot read the TSS's stack pointer at "
                         "+%#x", vector, at);
            return -1;
        }
    }
    rsp &= ~0xfULL;
    if (has_err)
        frame[n++] = err;
    frame[n++] = rip;
    frame[n++] = s->cs.selector;
    frame[n++] = regs->rflags | (fault ? RFLAGS_RF : 0);
    frame[n++] = regs->rsp;
    frame[n++] = s->ss.selector;
    rsp -= (uint64_t)n * 8;
    if (hv_copy_to_guest(v, rsp, frame, (uint64_t)n * 8) < 0) {
        hv_set_error(why, why_len, "vector %u: cannot write the frame at %#llx", vector,
                     (unsigned long long)rsp);
        return -1;
    }
    regs->rsp = rsp;
    regs->rip = target;
    regs->rflags &= ~(RFLAGS_TF | RFLAGS_NT | RFLAGS_RF | RFLAGS_VM |
                      (type == 0xe ? RFLAGS_IF : 0));
    if (same_cs)
        return 0;
    if (new_cs.dpl < cpl) {     /* into a more privileged ring: SS becomes NULL */
        s->ss.selector = new_cs.dpl;
        s->ss.dpl = new_cs.dpl;
        s->ss.unusable = 0;
    }
    s->cs = new_cs;
    return sregs_changed(v, why, why_len);
nested:
    hv_set_error(why, why_len, "vector %u: IDT entry not a present 64-bit gate while "
                 "delivering a fault (double fault not emulated)", vector);
    return -1;
}

/* A software interrupt (int n, int3): the gate's DPL must let the current ring in,
 * else #GP(vector*8 + 2) at the instruction (regs->rip); `next` is the return address. */
static int soft_int(struct hv_vcpu *v, unsigned vector, uint64_t next, char *why, int why_len)
{
    struct kvm_sregs *s = &v->run->s.regs.sregs;
    uint8_t gate[16];
    if (vector * 16 + 15 <= s->idt.limit &&
        hv_copy_from_guest(v, gate, s->idt.base + vector * 16, 16) == 0 &&
        ((gate[5] >> 5) & 3) < s->cs.dpl)
        return deliver(v, 13, 1, (uint64_t)vector << 3 | 2, v->run->s.regs.regs.rip, 1, 0,
                       why, why_len);
    return deliver(v, vector, 0, 0, next, 0, 1, why, why_len);
}

/* cmpxchg16b on the host mapping: atomic against the other vCPUs and the backends. */
static int cmpxchg16(volatile uint64_t *p, uint64_t *lo, uint64_t *hi, uint64_t new_lo,
                     uint64_t new_hi)
{
    unsigned char ok;
    __asm__ __volatile__("lock cmpxchg16b %1\n\tsete %0"
                         : "=q"(ok), "+m"(*(volatile __int128 *)p), "+a"(*lo), "+d"(*hi)
                         : "b"(new_lo), "c"(new_hi)
                         : "memory", "cc");
    return ok;
}

static int emulate_cmpxchg16b(struct hv_vcpu *v, uint64_t addr, uint64_t next,
                              char *why, int why_len)
{
    struct kvm_regs *regs = &v->run->s.regs.regs;
    struct hv_domain *d = v->dom;
    uint64_t gpa;

    if (addr & 15)
        return deliver(v, 13, 1, 0, regs->rip, 1, 0, why, why_len);
    if (hv_gva_to_gpa(v, addr, 1, &gpa) < 0 || gpa + 16 > d->ram_bytes) {
        hv_set_error(why, why_len, "cmpxchg16b: %#llx is not writable guest RAM",
                     (unsigned long long)addr);
        return -1;
    }
    uint64_t lo = regs->rax, hi = regs->rdx;
    if (cmpxchg16((volatile uint64_t *)(d->ram + gpa), &lo, &hi, regs->rbx, regs->rcx)) {
        regs->rflags |= RFLAGS_ZF;
    } else {
        regs->rflags &= ~RFLAGS_ZF;
        regs->rax = lo;
        regs->rdx = hi;
    }
    regs->rip = next;
    return 0;
}

/* fnop (an x87 instruction: #NM on EM or TS) or fwait (#NM only on MP and TS); both
 * then take a pending unmasked x87 exception. */
static int emulate_fnop(struct hv_vcpu *v, uint64_t next, int is_fwait, char *why,
                        int why_len)
{
    struct kvm_regs *regs = &v->run->s.regs.regs;
    uint64_t cr0 = v->run->s.regs.sregs.cr0;
    struct kvm_fpu fpu;

    if (is_fwait ? (cr0 & (CR0_MP | CR0_TS)) == (CR0_MP | CR0_TS)
                 : (cr0 & (CR0_EM | CR0_TS)) != 0)
        return deliver(v, 7, 0, 0, regs->rip, 1, 0, why, why_len);
    if (ioctl(v->fd, KVM_GET_FPU, &fpu) < 0) {
        hv_set_error(why, why_len, "fnop: KVM_GET_FPU: %s", strerror(errno));
        return -1;
    }
    if ((fpu.fsw & 0x80) && (cr0 & CR0_NE))
        return deliver(v, 16, 0, 0, regs->rip, 1, 0, why, why_len);
    regs->rip = next;
    return 0;
}

static int ud(struct hv_vcpu *v, char *why, int why_len);

static int get_xcr0(struct hv_vcpu *v, uint64_t *xcr0, char *why, int why_len)
{
    struct kvm_xcrs xcrs;
    memset(&xcrs, 0, sizeof(xcrs));
    if (ioctl(v->fd, KVM_GET_XCRS, &xcrs) < 0) {
        hv_set_error(why, why_len, "KVM_GET_XCRS: %s", strerror(errno));
        return -1;
    }
    *xcr0 = 0;
    for (unsigned k = 0; k < xcrs.nr_xcrs; k++)
        if (xcrs.xcrs[k].xcr == 0)
            *xcr0 = xcrs.xcrs[k].value;
    return 0;
}

/* xgetbv with ECX 0: #UD without CR4.OSXSAVE, else EDX:EAX = XCR0. */
static int emulate_xgetbv0(struct hv_vcpu *v, uint64_t next, char *why, int why_len)
{
    struct kvm_regs *regs = &v->run->s.regs.regs;
    uint64_t xcr0;
    if (!(v->run->s.regs.sregs.cr4 & CR4_OSXSAVE))
        return ud(v, why, why_len);
    if (get_xcr0(v, &xcr0, why, why_len) < 0)
        return -1;
    regs->rax = (uint32_t)xcr0;
    regs->rdx = xcr0 >> 32;
    regs->rip = next;
    return 0;
}

/* An AVX register move onto itself: #UD without CR4.OSXSAVE or XCR0's SSE and AVX
 * bits, #NM on CR0.TS, else the upper 128 bits of ymm`reg` become zero. */
static int emulate_vmov_self(struct hv_vcpu *v, unsigned reg, uint64_t next, char *why,
                             int why_len)
{
    struct kvm_sregs *s = &v->run->s.regs.sregs;
    uint64_t xcr0;

    if (!(s->cr4 & CR4_OSXSAVE))
        return ud(v, why, why_len);
    if (get_xcr0(v, &xcr0, why, why_len) < 0)
        return -1;
    if ((xcr0 & 6) != 6)
        return ud(v, why, why_len);
    if (s->cr0 & CR0_TS)
        return deliver(v, 7, 0, 0, v->run->s.regs.regs.rip, 1, 0, why, why_len);
    struct kvm_xsave xs;
    if (ioctl(v->fd, KVM_GET_XSAVE, &xs) < 0) {
        hv_set_error(why, why_len, "KVM_GET_XSAVE: %s", strerror(errno));
        return -1;
    }
    uint8_t *area = (uint8_t *)xs.region;
    if (area[512] & 4) {            /* XSTATE_BV.AVX: the upper halves are live */
        memset(area + 576 + 16 * reg, 0, 16);
        if (ioctl(v->fd, KVM_SET_XSAVE, &xs) < 0) {
            hv_set_error(why, why_len, "KVM_SET_XSAVE: %s", strerror(errno));
            return -1;
        }
    }
    v->run->s.regs.regs.rip = next;
    return 0;
}

/* #UD: a fault at the instruction. */
static int ud(struct hv_vcpu *v, char *why, int why_len)
{
    int rc = deliver(v, 6, 0, 0, v->run->s.regs.regs.rip, 1, 0, why, why_len);
    if (rc == 0)
        v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
    return rc;
}

/* A VT-x instruction other than vmcall (the PVH hypercall path, handled by KVM):
 * vmptrld/vmclear/vmxon m64 (0f c7 /6), vmptrst m64 (0f c7 /7), vmlaunch, vmresume,
 * vmxoff (0f 01 c2-c4), vmread (0f 78), vmwrite (0f 79), invept/invvpid (66 0f 38 80/81). */
static int vmx_insn(const uint8_t *b, int n, int any_prefix)
{
    (void)any_prefix;
    if (n < 3 || b[0] != 0x0f)
        return 0;
    if (b[1] == 0xc7)
        return (b[2] >> 6) != 3 && ((b[2] >> 3) & 7) >= 6;
    if (b[1] == 0x01)
        return b[2] >= 0xc2 && b[2] <= 0xc4;
    if (b[1] == 0x78 || b[1] == 0x79)
        return 1;
    if (b[1] == 0x38 && n >= 4)
        return b[2] == 0x80 || b[2] == 0x81;
    return 0;
}

/* The bytes at RIP, as many as can be read (up to 15); returns how many. */
static int fetch(struct hv_vcpu *v, uint64_t rip, uint8_t *buf)
{
    int n = 0;
    while (n < 15 && hv_copy_from_guest(v, buf + n, rip + (uint64_t)n, 1) == 0)
        n++;
    return n;
}

int hv_kvm_emulate(struct hv_vcpu *v, char *why, int why_len)
{
    struct kvm_regs *regs = &v->run->s.regs.regs;
    struct kvm_sregs *s = &v->run->s.regs.sregs;
    uint8_t b[15];
    int n, i = 0, rex = 0, addr32 = 0, prefix66 = 0, prefixf3 = 0, prefixf2 = 0;
    uint64_t seg_base = 0;

    /* native guests do not sync sregs: read them into the (unused) sync area, which we
     * only read and never mark dirty */
    if (!(v->run->kvm_valid_regs & KVM_SYNC_X86_SREGS) && ioctl(v->fd, KVM_GET_SREGS, s) < 0) {
        hv_set_error(why, why_len, "KVM_GET_SREGS: %s", strerror(errno));
        return -1;
    }
    v->cr3 = s->cr3;
    v->cr3_valid = 1;
    n = fetch(v, regs->rip, b);

    for (; i < n; i++) {
        uint8_t p = b[i];
        if (p == 0x66) { prefix66 = 1; continue; }
        if (p == 0xf3) { prefixf3 = 1; continue; }
        if (p == 0xf2) { prefixf2 = 1; continue; }
        if (p == 0xf0 || p == 0x2e || p == 0x36 || p == 0x3e || p == 0x26)
            continue;
        if (p == 0x67) { addr32 = 1; continue; }
        if (p == 0x64) { seg_base = s->fs.base; continue; }
        if (p == 0x65) { seg_base = s->gs.base; continue; }
        break;
    }
    if (i < n && (b[i] & 0xf0) == 0x40 && s->cs.l)
        rex = b[i++];
    if (!s->cs.l)
        goto unknown;               /* only 64-bit code is decoded */

    if (i < n && b[i] == 0xcc) {        /* int3 */
        int rc = soft_int(v, 3, regs->rip + i + 1, why, why_len);
        if (rc == 0)
            v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
        return rc;
    }
    if (i + 1 < n && b[i] == 0xcd) {    /* int imm8 */
        int rc = soft_int(v, b[i + 1], regs->rip + i + 2, why, why_len);
        if (rc == 0)
            v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
        return rc;
    }
    if (i < n && b[i] == 0xf1) {        /* icebp (int1): #DB as a trap */
        int rc = deliver(v, 1, 0, 0, regs->rip + i + 1, 0, 0, why, why_len);
        if (rc == 0)
            v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
        return rc;
    }
    if (i < n && b[i] == 0xce)          /* into: invalid in 64-bit mode */
        return ud(v, why, why_len);
    if (vmx_insn(b + i, n - i, prefix66 | prefixf3 | prefixf2)) {
        /* VT-x instructions outside VMX operation (CR4.VMXE clear): #UD */
        if (s->cr4 & CR4_VMXE)
            goto unknown;
        return ud(v, why, why_len);
    }
    if (i + 1 < n && (b[i] == 0xd9 && b[i + 1] == 0xd0)) {      /* fnop */
        int rc = emulate_fnop(v, regs->rip + i + 2, 0, why, why_len);
        if (rc == 0)
            v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
        return rc;
    }
    if (i + 3 < n && b[i] == 0xc5 && (b[i + 1] & 0x7f) == 0x78 &&
        (b[i + 2] == 0x10 || b[i + 2] == 0x28) && (b[i + 3] >> 6) == 3 &&
        ((b[i + 3] >> 3) & 7) == (b[i + 3] & 7) && !(b[i + 1] & 0x80) == 0) {
        /* vmovups/vmovaps xmmN, xmmN (VEX.128): a move onto itself that zeroes the
         * upper half of ymmN */
        int rc = emulate_vmov_self(v, b[i + 3] & 7, regs->rip + i + 4, why, why_len);
        if (rc == 0)
            v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
        return rc;
    }
    if (i + 2 < n && b[i] == 0x0f && b[i + 1] == 0x01 && b[i + 2] == 0xd0 &&
        (uint32_t)regs->rcx == 0) {     /* xgetbv, XCR0 */
        int rc = emulate_xgetbv0(v, regs->rip + i + 3, why, why_len);
        if (rc == 0)
            v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
        return rc;
    }
    if (i < n && b[i] == 0x9b) {        /* fwait */
        int rc = emulate_fnop(v, regs->rip + i + 1, 1, why, why_len);
        if (rc == 0)
            v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
        return rc;
    }
    if (i + 2 < n && b[i] == 0x0f && b[i + 1] == 0xc7 && (rex & 8) &&
        ((b[i + 2] >> 3) & 7) == 1 && (b[i + 2] >> 6) != 3) {   /* cmpxchg16b m128 */
        uint8_t modrm = b[i + 2];
        unsigned mod = modrm >> 6, rm = modrm & 7;
        uint64_t addr = 0;
        int j = i + 3, rip_rel = 0;
        if (rm == 4) {
            if (j >= n)
                goto unknown;
            uint8_t sib = b[j++];
            unsigned scale = sib >> 6, index = ((sib >> 3) & 7) | ((rex & 2) << 2);
            unsigned base = (sib & 7) | ((rex & 1) << 3);
            if (index != 4)
                addr += *gpr(regs, index) << scale;
            if ((sib & 7) == 5 && mod == 0) {
                mod = 2;        /* disp32, no base */
            } else {
                addr += *gpr(regs, base);
            }
        } else if (rm == 5 && mod == 0) {
            rip_rel = 1;
            mod = 2;
        } else {
            addr += *gpr(regs, rm | ((rex & 1) << 3));
        }
        if (mod == 1) {
            if (j + 1 > n)
                goto unknown;
            addr += (uint64_t)(int64_t)(int8_t)b[j++];
        } else if (mod == 2) {
            if (j + 4 > n)
                goto unknown;
            int32_t disp;
            memcpy(&disp, b + j, 4);
            j += 4;
            addr += (uint64_t)(int64_t)disp;
        }
        uint64_t next = regs->rip + (uint64_t)j;
        if (rip_rel)
            addr += next;
        if (addr32)
            addr &= 0xffffffffULL;
        addr += seg_base;
        int rc = emulate_cmpxchg16b(v, addr, next, why, why_len);
        if (rc == 0)
            v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
        return rc;
    }

unknown:;
    char hex[15 * 3 + 1] = "";
    int pos = 0;
    for (int k = 0; k < n; k++)
        pos += snprintf(hex + pos, sizeof(hex) - (size_t)pos, "%s%02x", k ? " " : "", b[k]);
    hv_set_error(why, why_len, "cannot emulate [%s]", n ? hex : "unreadable");
    return -1;
}

/* ---- events KVM stopped on (kvm.c keeps the guest's TSS from it) ---- */

/* How many legacy and REX prefixes start the bytes at b (64-bit code). */
static int prefixes(const uint8_t *b, int n)
{
    int i = 0;
    while (i < n && (b[i] == 0x66 || b[i] == 0x67 || b[i] == 0xf0 || b[i] == 0xf2 ||
                     b[i] == 0xf3 || b[i] == 0x2e || b[i] == 0x36 || b[i] == 0x3e ||
                     b[i] == 0x26 || b[i] == 0x64 || b[i] == 0x65))
        i++;
    if (i < n && (b[i] & 0xf0) == 0x40)
        i++;
    return i;
}

/* Whether ring 3 may access `size` ports from `port`: CPL <= IOPL, or every one of
 * their bits in the TSS's I/O bitmap clear and inside the TSS limit. */
static int port_allowed(struct hv_vcpu *v, uint32_t port, unsigned size)
{
    struct kvm_sregs *s = &v->run->s.regs.sregs;
    uint16_t base;

    if (((v->run->s.regs.regs.rflags >> 12) & 3) >= s->cs.dpl)
        return 1;
    if (s->tr.limit < 0x67 || hv_copy_from_guest(v, &base, s->tr.base + 0x66, 2) < 0)
        return 0;
    for (uint32_t p = port; p < port + size; p++) {
        uint8_t bits;
        uint32_t at = base + p / 8;
        if (at + 1 > s->tr.limit ||     /* the CPU reads two bytes of the bitmap */
            hv_copy_from_guest(v, &bits, s->tr.base + at, 1) < 0 ||
            (bits >> (p & 7)) & 1)
            return 0;
    }
    return 1;
}

/* A ring-3 `in` or `out` the guest's I/O bitmap lets through, done for KVM (which
 * would need the TSS back to read that bitmap): the device's access, the value into
 * al/ax/eax for `in` (eax zero-extends into rax, as the CPU's 32-bit write does), rip
 * past the instruction. */
static void port_in_out(struct hv_vcpu *v, uint16_t port, unsigned size, int out, uint64_t next)
{
    struct kvm_regs *regs = &v->run->s.regs.regs;
    uint8_t data[4];
    uint32_t value = (uint32_t)regs->rax;

    memcpy(data, &value, 4);
    v->dom->counters.exits[HV_EXIT_IO]++;
    if (!hv_devices_port_io(v, port, (int)size, out, data)) {
        v->dom->counters.unknown_port_io++;     /* reads float high, writes vanish */
        if (!out)
            memset(data, 0xff, sizeof(data));
    }
    if (!out) {
        memcpy(&value, data, 4);
        if (size == 4)
            regs->rax = value;
        else if (size == 2)
            regs->rax = (regs->rax & ~0xffffULL) | (value & 0xffff);
        else
            regs->rax = (regs->rax & ~0xffULL) | (value & 0xff);
    }
    regs->rip = next;
}

int hv_kvm_deliver_stopped_event(struct hv_vcpu *v, char *why, int why_len)
{
    struct kvm_regs *regs = &v->run->s.regs.regs;
    struct kvm_sregs *s = &v->run->s.regs.sregs;
    struct kvm_vcpu_events ev;
    uint8_t b[15], gate[16];
    unsigned vector;
    int rc, n, i;

    if (hv_kvm_vcpu_events(v, &ev) < 0) {
        hv_set_error(why, why_len, "KVM_GET_VCPU_EVENTS: %s", strerror(errno));
        return -1;
    }
    v->cr3 = s->cr3;
    v->cr3_valid = 1;
    vector = ev.exception.nr;
    regs->rflags &= ~RFLAGS_RF;     /* KVM set it for the fault it meant to deliver */
    /* Only an event from ring 3 or through an IST gate reads the TSS: without either,
     * KVM's triple fault is the guest's own (why stays empty). */
    if (s->cs.dpl != 3 && (vector * 16 + 15 > s->idt.limit ||
                           hv_copy_from_guest(v, gate, s->idt.base + vector * 16, 16) < 0 ||
                           !(gate[4] & 7)))
        return -1;
    if (vector == 6 && s->cs.l) {
        /* this host's #UD for int n (PVM-HOST.md): the int n the CPU would have done */
        n = fetch(v, regs->rip, b);
        i = prefixes(b, n);
        if (i + 1 < n && b[i] == 0xcd) {
            rc = soft_int(v, b[i + 1], regs->rip + (uint64_t)i + 2, why, why_len);
            goto out;
        }
    }
    if (vector == 1 && s->cs.l) {
        /* this host reports ring 3's icebp (f1) at the instruction, a trap after it on
         * the CPU; an instruction breakpoint there would say so in DR6 */
        struct kvm_debugregs dbg;
        n = fetch(v, regs->rip, b);
        i = prefixes(b, n);
        if (i < n && b[i] == 0xf1 && ioctl(v->fd, KVM_GET_DEBUGREGS, &dbg) == 0 &&
            !(dbg.dr6 & 0xf)) {
            rc = deliver(v, 1, 0, 0, regs->rip + (uint64_t)i + 1, 0, 0, why, why_len);
            goto out;
        }
    }
    if (vector == 3 && s->cs.l) {
        /* a trap after int3 (cc) or int 3 (cd 03), with the DPL check KVM skipped; a
         * fault is reported at the instruction, prefixes and all */
        uint64_t next = regs->rip;
        n = fetch(v, next - 15, b) == 15 ? 15 : 0;
        int at = n - 1;
        if (n && b[n - 2] == 0xcd && b[n - 1] == 3)
            at = n - 2;
        if (at > 0 && (b[at - 1] & 0xf0) == 0x40)
            at--;                       /* REX */
        while (at > 0 && prefixes(b + at - 1, 1) == 1 && (b[at - 1] & 0xf0) != 0x40)
            at--;
        regs->rip = next - (uint64_t)(n - at);
        if (!n)
            regs->rip = next - 1;
        rc = soft_int(v, 3, next, why, why_len);
        goto out;
    }
    if (vector == 13 && s->cs.dpl == 3 && ev.exception.error_code == 0 && s->cs.l) {
        /* in, out, ins, outs: KVM's #GP may only say it could not read the TSS's I/O
         * bitmap. Denied, it is the #GP; let through, KVM does the access with the
         * TSS back (the caller) */
        n = fetch(v, regs->rip, b);
        i = prefixes(b, n);
        if (i + 1 < n && ((b[i] >= 0xe4 && b[i] <= 0xe7) || (b[i] >= 0xec && b[i] <= 0xef) ||
                          (b[i] >= 0x6c && b[i] <= 0x6f))) {
            int wide = b[i] & 1, data16 = 0;
            for (int k = 0; k < i; k++)
                data16 |= b[k] == 0x66;
            int imm = b[i] >= 0xe4 && b[i] <= 0xe7, string = b[i] <= 0x6f;
            unsigned size = wide ? (data16 ? 2 : 4) : 1;
            uint32_t port = imm ? b[i + 1] : (uint16_t)regs->rdx;
            if (port_allowed(v, port, size)) {
                if (string)
                    return 1;
                /* in/out: done here, one exit as the port's own would be */
                port_in_out(v, (uint16_t)port, size, !(b[i] & 2) ? 0 : 1,
                            regs->rip + (uint64_t)i + (imm ? 2 : 1));
                v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
                return 2;
            }
        }
    }
    /* everything else as KVM meant it: #DB and #OF are traps, the rest faults */
    rc = deliver(v, vector, ev.exception.has_error_code, ev.exception.error_code, regs->rip,
                 vector != 1 && vector != 4, 0, why, why_len);
out:
    if (rc == 0)
        v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
    return rc;
}

int hv_kvm_deliver_interrupt(struct hv_vcpu *v, unsigned vector, char *why, int why_len)
{
    struct kvm_regs *regs = &v->run->s.regs.regs;
    v->cr3 = v->run->s.regs.sregs.cr3;
    v->cr3_valid = 1;
    int rc = deliver(v, vector, 0, 0, regs->rip, 0, 0, why, why_len);
    if (rc == 0)
        v->run->kvm_dirty_regs |= KVM_SYNC_X86_REGS;
    return rc;
}
