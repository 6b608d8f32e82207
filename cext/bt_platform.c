/*
 * bt_platform.c - what the bt engine's virtual CPU truthfully is, where TCG's CPU model
 * (a Haswell-era Intel part) says less: TCG executes one instruction at a time with no
 * speculation, no shared fill buffers and no L1 cache to leak, so it is not affected by
 * Meltdown, L1TF, MDS, TAA, the MMIO stale-data or store-bypass families, nor by indirect
 * target selection (it has no branch predictor to select a target from). A hypervisor
 * says so through IA32_ARCH_CAPABILITIES (CPUID.7.0:EDX[29], MSR 0x10a), as Xen does for
 * a guest whose hardware is not affected; Linux then skips page-table isolation, which
 * on bt costs a page-table switch and a TLB flush at every kernel entry and exit, and
 * the ITS mitigation, which on bt turns every function return into a jump to a thunk:
 * one more translated block to run per return.
 *
 * Leaf 7 is TCG's own answer (asked once, of a scratch CPU) with the one bit added.
 */
#include <pthread.h>
#include <string.h>

#include "bt.h"

#define MSR_ARCH_CAPABILITIES   0x10au
#define CPUID7_EDX_ARCH_CAP     (1u << 29)

/* IA32_ARCH_CAPABILITIES bits (Intel SDM vol. 4, table 2-2) that say "not affected". */
#define ARCH_CAP_RDCL_NO        (1ULL << 0)     /* Meltdown (and so L1TF) */
#define ARCH_CAP_SSB_NO         (1ULL << 4)     /* speculative store bypass */
#define ARCH_CAP_MDS_NO         (1ULL << 5)
#define ARCH_CAP_PSCHANGE_MC_NO (1ULL << 6)     /* iTLB multihit */
#define ARCH_CAP_TAA_NO         (1ULL << 8)
#define ARCH_CAP_SBDR_SSDP_NO   (1ULL << 13)    /* the MMIO stale-data family */
#define ARCH_CAP_FBSDP_NO       (1ULL << 14)
#define ARCH_CAP_PSDP_NO        (1ULL << 15)
#define ARCH_CAP_BHI_NO         (1ULL << 20)
#define ARCH_CAP_PBRSB_NO       (1ULL << 24)
#define ARCH_CAP_GDS_NO         (1ULL << 26)
#define ARCH_CAP_RFDS_NO        (1ULL << 27)
#define ARCH_CAP_ITS_NO         (1ULL << 62)    /* indirect target selection */

static const uint64_t arch_capabilities =
    ARCH_CAP_RDCL_NO | ARCH_CAP_SSB_NO | ARCH_CAP_MDS_NO | ARCH_CAP_PSCHANGE_MC_NO |
    ARCH_CAP_TAA_NO | ARCH_CAP_SBDR_SSDP_NO | ARCH_CAP_FBSDP_NO | ARCH_CAP_PSDP_NO |
    ARCH_CAP_BHI_NO | ARCH_CAP_PBRSB_NO | ARCH_CAP_GDS_NO | ARCH_CAP_RFDS_NO |
    ARCH_CAP_ITS_NO;

static uint32_t tcg_leaf7[4];
static int tcg_leaf7_known;
static pthread_once_t leaf7_once = PTHREAD_ONCE_INIT;

/* Run one cpuid (leaf 7, sub-leaf 0) on a scratch TCG CPU and keep its answer. */
static void ask_tcg_leaf7(void)
{
    static uint8_t page[4096] __attribute__((aligned(4096)));
    static const int regs[4] = { UC_X86_REG_RAX, UC_X86_REG_RBX, UC_X86_REG_RCX, UC_X86_REG_RDX };
    uint64_t rax = 7, rcx = 0, out[4] = { 0 };
    uc_engine *uc;

    if (bt_uc.open(UC_ARCH_X86, UC_MODE_64, &uc) != UC_ERR_OK)
        return;
    page[0] = 0x0f;                 /* cpuid */
    page[1] = 0xa2;
    if (bt_uc.mem_map_ptr(uc, 0x1000, sizeof(page), UC_PROT_READ | UC_PROT_EXEC, page) == UC_ERR_OK &&
        bt_uc.reg_write(uc, UC_X86_REG_RAX, &rax) == UC_ERR_OK &&
        bt_uc.reg_write(uc, UC_X86_REG_RCX, &rcx) == UC_ERR_OK &&
        bt_uc.emu_start(uc, 0x1000, 0x1002, 0, 1) == UC_ERR_OK) {
        for (int i = 0; i < 4; i++) {
            bt_uc.reg_read(uc, regs[i], &out[i]);
            tcg_leaf7[i] = (uint32_t)out[i];
        }
        tcg_leaf7_known = 1;
    }
    bt_uc.close(uc);
}

int bt_platform_cpuid(struct bt_vcpu *b, uint32_t leaf, uint32_t subleaf, uint32_t out[4])
{
    (void)b;
    if (leaf != 7 || subleaf != 0)
        return 0;
    pthread_once(&leaf7_once, ask_tcg_leaf7);
    if (!tcg_leaf7_known)
        return 0;                   /* TCG's answer, without the bit */
    memcpy(out, tcg_leaf7, sizeof(tcg_leaf7));
    out[3] |= CPUID7_EDX_ARCH_CAP;
    return 1;
}

int bt_platform_msr(struct bt_vcpu *b, uint32_t msr)
{
    (void)b;
    return msr == MSR_ARCH_CAPABILITIES;
}

int bt_platform_rdmsr(struct bt_vcpu *b, uint32_t msr, uint64_t *value)
{
    if (!bt_platform_msr(b, msr))
        return -1;
    *value = arch_capabilities;
    return 0;
}

int bt_platform_wrmsr(struct bt_vcpu *b, uint32_t msr, uint64_t value)
{
    (void)b;
    (void)msr;
    (void)value;
    return -1;                      /* read-only: #GP */
}
