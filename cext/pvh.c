/*
 * pvh.c - what a PVH guest finds in trapless, whichever engine runs it: the Xen CPUID
 * leaves, the hypercall page it asks for through the MSR those leaves name, and
 * hypercalls made from whatever mode it runs in (XEN-ABI-FACTS sections 1, 24, 26).
 *
 * A PVH guest starts in 32-bit protected mode and switches to long mode itself, so a
 * hypercall's arguments are in the registers of its mode at the time: rdi, rsi, rdx,
 * r10, r8 from 64-bit code; ebx, ecx, edx, esi, edi from 32-bit code, whose results
 * are 32 bits wide. Xen refuses hypercalls from guest user mode (CPL > 0) with -EPERM.
 *
 * The hypercall page trapless writes holds, in stub N, `mov eax, N; out 0xCA, eax;
 * ret`: the `out` is the exit on both engines (kvm cannot intercept vmcall without
 * KVM_CAP_XEN_HVM), and the VMM writes the result to rax as vmcall's handler would.
 * Slot 23 (iret, a PV-only hypercall) is ud2, as in Xen's HVM page.
 *
 * The platform around the vCPU is Xen's for a PVH domU: a local APIC (dev_lapic.c) at
 * 0xfee00000 and nothing else. Guest-physical space below 4 GiB that is neither RAM nor
 * the APIC reads as all ones and swallows writes, as Xen's HVM does for an access no
 * device model claims.
 */
#include <string.h>

#include "hv.h"
#include "grant_table.h"

#define CR0_PG            (1ULL << 31)
#define EFER_LMA          (1ULL << 10)

int hv_pvh_long_mode(struct hv_vcpu *v)
{
    struct hv_cpu_mode m;
    if (!v->ops->get_mode || v->ops->get_mode(v, &m) < 0)
        return 1;
    return (m.efer & EFER_LMA) && m.cs_long;
}

int hv_pvh_cpuid(struct hv_vcpu *v, uint32_t leaf, uint32_t subleaf, uint32_t out[4])
{
    if (leaf < HV_PVH_CPUID_BASE || leaf >= HV_PVH_CPUID_BASE + 0x100)
        return 0;
    hv_xen_cpuid(v, leaf - HV_PVH_CPUID_BASE, subleaf, out);    /* xen_cpuid.c */
    return 1;
}

/* Fill the page at gpa with the stubs (see the top of the file). */
static void write_hypercall_page(struct hv_domain *d, uint64_t gpa)
{
    uint8_t *page = d->ram + gpa;
    memset(page, 0xcc, HV_PAGE_SIZE);
    for (uint32_t n = 0; n < TRAPLESS_HYPERCALL_PAGE_STUBS; n++) {
        uint8_t *stub = page + n * TRAPLESS_HYPERCALL_STUB_SIZE;
        if (n == __HYPERVISOR_iret) {
            stub[0] = 0x0f;         /* ud2 */
            stub[1] = 0x0b;
            continue;
        }
        stub[0] = 0xb8;             /* mov eax, n */
        memcpy(stub + 1, &n, 4);
        stub[5] = 0xe7;             /* out imm8, eax */
        stub[6] = TRAPLESS_HYPERCALL_PORT;
        stub[7] = 0xc3;             /* ret */
    }
}

int hv_pvh_wrmsr(struct hv_vcpu *v, uint32_t msr, uint64_t value)
{
    struct hv_domain *d = v->dom;
    uint64_t gpa = value & ~(HV_PAGE_SIZE - 1);

    if (d->guest_type != HV_GUEST_PVH)
        return -1;
    if (msr != HV_PVH_HYPERCALL_MSR) {
        int r = hv_lapic_wrmsr(v, msr, value);
        return r == 1 ? 0 : -1;
    }
    /* one page (CPUID B+2 eax): its index, the low bits, must be 0; the page RAM */
    if ((value & (HV_PAGE_SIZE - 1)) != 0 || !hv_gpa_valid(d, gpa, HV_PAGE_SIZE))
        return -1;
    write_hypercall_page(d, gpa);
    return 0;
}

/* The MSRs of a PVH vCPU the VMM answers itself (the rest are the CPU's). */
int hv_pvh_msr_owned(struct hv_vcpu *v, uint32_t msr)
{
    uint64_t ignored;
    return v->dom->guest_type == HV_GUEST_PVH &&
           (msr == HV_PVH_HYPERCALL_MSR || hv_lapic_rdmsr(v, msr, &ignored));
}

/* 0 and *value, or -1: #GP. */
int hv_pvh_rdmsr(struct hv_vcpu *v, uint32_t msr, uint64_t *value)
{
    if (hv_lapic_rdmsr(v, msr, value))
        return 0;
    return -1;                      /* the hypercall MSR is write-only, as in Xen */
}

/* An access to guest-physical memory outside RAM: 1 handled (the APIC, or the empty
 * space that reads as all ones), 0 not a PVH guest's. */
int hv_pvh_mmio(struct hv_vcpu *v, uint64_t gpa, int size, int is_write, uint8_t *data)
{
    if (v->dom->guest_type != HV_GUEST_PVH || size < 1 || size > 8)
        return 0;
    if (hv_lapic_mmio(v, gpa, size, is_write, data))
        return 1;
    if (hv_gnt_hole_access(v->dom, gpa, size, is_write, data))
        return 1;
    if (gpa >= (1ULL << 32))
        return 0;
    if (!is_write)
        memset(data, 0xff, (size_t)size);
    return 1;
}

/* The ACPI sleep registers (hardware-reduced ACPI 6, 4.8.3.7): a byte write to the
 * control register with SLP_EN (bit 5) and SLP_TYP (bits 2-4) of \_S5 is the guest's
 * poweroff, as the ACPI PM1a control register is for Xen's HVM guests; other sleep
 * states are not offered (the DSDT names only \_S5). The status register reads 0 (no
 * wake event). 1 if the port is one of them. */
#define ACPI_SLP_EN          0x20
#define ACPI_SLP_TYP_SHIFT   2
#define ACPI_SLP_TYP_MASK    0x1c

int hv_pvh_port_io(struct hv_vcpu *v, uint16_t port, int size, int is_write, uint8_t *data)
{
    if (v->dom->guest_type != HV_GUEST_PVH ||
        (port != TRAPLESS_ACPI_SLEEP_CONTROL_PORT && port != TRAPLESS_ACPI_SLEEP_STATUS_PORT))
        return 0;
    if (!is_write) {
        memset(data, 0, (size_t)size);
        return 1;
    }
    if (port == TRAPLESS_ACPI_SLEEP_CONTROL_PORT && (data[0] & ACPI_SLP_EN) &&
        ((data[0] & ACPI_SLP_TYP_MASK) >> ACPI_SLP_TYP_SHIFT) == TRAPLESS_ACPI_S5_SLP_TYP)
        hv_domain_shutdown(v->dom, SHUTDOWN_poweroff);
    return 1;
}

uint64_t hv_pvh_hypercall(struct hv_vcpu *v, const struct hv_pvh_regs *r)
{
    struct hv_cpu_mode m = { .cpl = 0 };
    struct hv_hcall h;
    int64_t ret;
    int wide;

    if (v->ops->get_mode && v->ops->get_mode(v, &m) == 0 && m.cpl > 0) {
        v->dom->counters.exits[HV_EXIT_HYPERCALL]++;
        return (uint64_t)(int64_t)-XEN_EPERM;
    }
    wide = (m.efer & EFER_LMA) && m.cs_long;
    if (wide) {
        h = (struct hv_hcall){ .nr = r->rax, .a1 = r->rdi, .a2 = r->rsi, .a3 = r->rdx,
                               .a4 = r->r10, .a5 = r->r8 };
    } else {
        h = (struct hv_hcall){ .nr = (uint32_t)r->rax, .a1 = (uint32_t)r->rbx,
                               .a2 = (uint32_t)r->rcx, .a3 = (uint32_t)r->rdx,
                               .a4 = (uint32_t)r->rsi, .a5 = (uint32_t)r->rdi };
    }
    v->dom->counters.exits[HV_EXIT_HYPERCALL]++;
    ret = hv_hypercall(v, &h);
    return wide ? (uint64_t)ret : (uint64_t)(uint32_t)ret;
}

/* The toolstack's side of the HVM parameters a PVH guest reads (Xen's domain builder
 * sets them; the guest may not): where its console ring and xenstore are. */
int hv_domain_set_hvm_param(struct hv_domain *d, uint32_t index, uint64_t value)
{
    if (index >= HVM_NR_PARAMS || index == HVM_PARAM_CALLBACK_IRQ)
        return -XEN_EINVAL;
    d->hvm_params[index] = value;
    return 0;
}
