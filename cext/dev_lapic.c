/*
 * dev_lapic.c - the local APIC Xen emulates for every PVH (and HVM) vCPU: the xAPIC
 * registers at 0xfee00000, IA32_APIC_BASE, and the timer (one-shot, periodic and
 * TSC-deadline). There is no IO-APIC, PIC or HPET behind it (Xen gives a PVH domU
 * none): its interrupts are the guest's own (self-IPIs, its timer) and the event
 * channel upcall vector (HVMOP_set_evtchn_upcall_vector), so one vCPU's APIC is all
 * there is to model. Register layout and semantics: Intel SDM vol. 3, chapter 11;
 * what Xen does: xen/arch/x86/hvm/vlapic.c.
 *
 * The timer counts at Xen's emulated bus rate, one tick per ns (vlapic.c's
 * APIC_BUS_CYCLE_NS), divided by the divide configuration. Its expiry is a deadline in
 * the domain's timer service (timers.c), which calls hv_lapic_timer_expired.
 *
 * Locking: the vCPU (register accesses, taking a vector), the timer thread (expiry) and
 * any thread raising an event (the upcall vector) take `lock`; nothing else is taken
 * while it is held, so waking the vCPU and moving the deadline happen after.
 */
#include <stdlib.h>
#include <string.h>
#include <x86intrin.h>

#include "hv.h"

#define LAPIC_VERSION       0x00050014u     /* version 0x14, 6 LVT entries (max LVT 5) */
#define SVR_ENABLED         0x100u
#define LVT_MASKED          0x10000u
#define LVT_TIMER_MODE      (3u << 17)
#define LVT_TIMER_PERIODIC  (1u << 17)
#define LVT_TIMER_TSC_DL    (2u << 17)
#define APIC_BASE_BSP       0x100u
#define APIC_BASE_ENABLE    0x800u
#define APIC_BASE_X2APIC    0x400u
#define MSR_APIC_BASE       0x1bu
#define MSR_TSC_DEADLINE    0x6e0u
#define ICR_SHORTHAND       (3u << 18)
#define ICR_SELF            (1u << 18)
#define ICR_DELIVERY_MODE   (7u << 8)

enum { LVT_CMCI, LVT_TIMER, LVT_THERMAL, LVT_PERF, LVT_LINT0, LVT_LINT1, LVT_ERROR, LVT_COUNT };

/* The bits of each LVT entry software may set (SDM figure 11-8). */
static const uint32_t lvt_writable[LVT_COUNT] = {
    0x107ff, 0x700ff, 0x107ff, 0x107ff, 0x1a7ff, 0x1a7ff, 0x100ff,
};

static struct hv_lapic *lapic_of(struct hv_vcpu *v)
{
    return v->lapic;
}

int hv_lapic_init(struct hv_vcpu *v)
{
    struct hv_lapic *a = calloc(1, sizeof(*a));
    if (!a)
        return -1;
    pthread_mutex_init(&a->lock, NULL);
    a->id = (uint32_t)v->id;
    a->dfr = 0xffffffffu;
    a->svr = 0xff;                  /* software-disabled, spurious vector 0xff */
    for (int i = 0; i < LVT_COUNT; i++)
        a->lvt[i] = LVT_MASKED;
    a->apic_base = HV_LAPIC_GPA | APIC_BASE_ENABLE | (v->id == 0 ? APIC_BASE_BSP : 0);
    v->lapic = a;
    return 0;
}

void hv_lapic_destroy(struct hv_vcpu *v)
{
    struct hv_lapic *a = lapic_of(v);
    if (!a)
        return;
    v->lapic = NULL;
    pthread_mutex_destroy(&a->lock);
    free(a);
}

/* ---- the 256-bit registers ---- */

static int highest_bit(const uint32_t reg[8])
{
    for (int w = 7; w >= 0; w--)
        if (reg[w])
            return w * 32 + 31 - __builtin_clz(reg[w]);
    return -1;
}

static void set_bit256(uint32_t reg[8], int vector)
{
    reg[vector / 32] |= 1u << (vector % 32);
}

static void clear_bit256(uint32_t reg[8], int vector)
{
    reg[vector / 32] &= ~(1u << (vector % 32));
}

/* Caller holds the lock. The processor priority (SDM 11.8.3.1). */
static uint32_t ppr(struct hv_lapic *a)
{
    int isrv = highest_bit(a->isr);
    uint32_t isr_class = isrv < 0 ? 0 : (uint32_t)isrv & 0xf0;
    return (a->tpr & 0xf0) >= isr_class ? a->tpr & 0xff : isr_class;
}

/* Caller holds the lock. A vector 0-15 is illegal: it is refused and logged in the ESR
 * (SDM 11.5.3, "received illegal vector"), as Xen's vlapic does. */
static void accept(struct hv_lapic *a, uint8_t vector)
{
    if (vector < 16) {
        a->esr_pending |= 1u << 6;
        return;
    }
    set_bit256(a->irr, vector);
}

/* ---- the timer ---- */

static uint64_t timer_divisor(struct hv_lapic *a)
{
    uint32_t v = (a->timer_divide & 3) | ((a->timer_divide >> 1) & 4);
    return 1ULL << ((v + 1) & 7);
}

/* Caller holds the lock. The current count (0 once a one-shot count has run out). */
static uint32_t timer_current(struct hv_lapic *a, uint64_t now)
{
    uint64_t ticks, period;
    if (!a->timer_initial || (a->lvt[LVT_TIMER] & LVT_TIMER_MODE) == LVT_TIMER_TSC_DL)
        return 0;
    ticks = (now - a->timer_start_ns) / timer_divisor(a);
    period = a->timer_initial;
    if ((a->lvt[LVT_TIMER] & LVT_TIMER_MODE) == LVT_TIMER_PERIODIC)
        return (uint32_t)(period - ticks % period);
    return ticks >= period ? 0 : (uint32_t)(period - ticks);
}

/* The guest's TSC value tsc as system time (the PV clock's scale; past values: now). */
static uint64_t tsc_to_system(struct hv_vcpu *v, uint64_t tsc, uint64_t now)
{
    uint64_t guest_tsc = __rdtsc() + (uint64_t)v->tsc_offset, delta;
    if (tsc <= guest_tsc || !v->tsc_to_system_mul)
        return now;
    delta = tsc - guest_tsc;
    if (v->tsc_shift >= 0)
        delta <<= v->tsc_shift;
    else
        delta >>= -v->tsc_shift;
    return now + (uint64_t)(((unsigned __int128)delta * v->tsc_to_system_mul) >> 32);
}

/* Caller holds the lock: the deadline the count (or IA32_TSC_DEADLINE) implies now. */
static uint64_t timer_deadline(struct hv_vcpu *v, struct hv_lapic *a, uint64_t now)
{
    if ((a->lvt[LVT_TIMER] & LVT_TIMER_MODE) == LVT_TIMER_TSC_DL)
        return a->tsc_deadline ? tsc_to_system(v, a->tsc_deadline, now) : 0;
    if (!a->timer_initial)
        return 0;
    return a->timer_start_ns + (uint64_t)a->timer_initial * timer_divisor(a);
}

void hv_lapic_timer_expired(struct hv_vcpu *v, uint64_t now)
{
    struct hv_lapic *a = lapic_of(v);
    uint64_t next = 0;
    int raised = 0;
    if (!a)
        return;
    pthread_mutex_lock(&a->lock);
    if (a->timer_deadline && a->timer_deadline <= now) {
        uint32_t lvt = a->lvt[LVT_TIMER];
        if (!(lvt & LVT_MASKED)) {
            accept(a, (uint8_t)lvt);
            raised = 1;
        }
        if ((lvt & LVT_TIMER_MODE) == LVT_TIMER_PERIODIC && a->timer_initial) {
            uint64_t period = (uint64_t)a->timer_initial * timer_divisor(a);
            /* fell behind: skip the missed periods rather than burst */
            a->timer_start_ns += ((now - a->timer_start_ns) / period) * period;
            next = a->timer_start_ns + period;
        } else if ((lvt & LVT_TIMER_MODE) == LVT_TIMER_TSC_DL) {
            a->tsc_deadline = 0;    /* the MSR reads 0 once it has fired (SDM 11.5.4.1) */
        }
        a->timer_deadline = next;
    }
    next = a->timer_deadline;
    pthread_mutex_unlock(&a->lock);
    hv_timers_set_lapic(v, next);
    if (raised)
        hv_vcpu_notify(v);
}

/* Caller holds the lock: after the count, the mode or the TSC deadline changed. The
 * new deadline goes to the timer service once the lock is let go. */
static uint64_t rearm(struct hv_vcpu *v, struct hv_lapic *a, uint64_t now)
{
    a->timer_deadline = timer_deadline(v, a, now);
    return a->timer_deadline;
}

/* ---- registers, by offset (xAPIC MMIO) ---- */

static uint32_t read_reg(struct hv_lapic *a, uint32_t off)
{
    uint64_t now = hv_system_time();
    if (off >= 0x100 && off < 0x180)
        return a->isr[(off - 0x100) >> 4];
    if (off >= 0x180 && off < 0x200)
        return a->tmr[(off - 0x180) >> 4];
    if (off >= 0x200 && off < 0x280)
        return a->irr[(off - 0x200) >> 4];
    if (off == 0x2f0)
        return a->lvt[LVT_CMCI];
    if (off >= 0x320 && off < 0x380)
        return a->lvt[LVT_TIMER + ((off - 0x320) >> 4)];
    switch (off) {
    case 0x20: return a->id << 24;
    case 0x30: return LAPIC_VERSION;
    case 0x80: return a->tpr;
    case 0xa0: return ppr(a);
    case 0xd0: return a->ldr;
    case 0xe0: return a->dfr;
    case 0xf0: return a->svr;
    case 0x280: return a->esr;
    case 0x300: return a->icr_low;
    case 0x310: return a->icr_high;
    case 0x380: return a->timer_initial;
    case 0x390: return timer_current(a, now);
    case 0x3e0: return a->timer_divide;
    default: return 0;              /* reserved and write-only registers read 0 */
    }
}

/* An IPI (ICR write): fixed delivery to this vCPU (itself, or by its APIC id) is all a
 * one-vCPU domain can receive; INIT, SIPI and NMI to itself are ignored, as Xen's
 * vlapic ignores INIT/SIPI to a running vCPU. */
static int send_ipi(struct hv_lapic *a)
{
    uint32_t shorthand = a->icr_low & ICR_SHORTHAND;
    int to_self = shorthand == ICR_SELF || shorthand == 2u << 18 ||
                  (shorthand == 0 && (a->icr_high >> 24) == a->id);
    if ((a->icr_low & ICR_DELIVERY_MODE) != 0)
        return 0;
    /* a fixed IPI with vector 0-15: the sender logs "send illegal vector" (SDM 11.5.3),
     * as Xen's vlapic_ipi() does, and a receiver refuses it in accept() */
    if ((uint8_t)a->icr_low < 16)
        a->esr_pending |= 1u << 5;
    if (!to_self)
        return 0;
    accept(a, (uint8_t)a->icr_low);
    return 1;
}

/* Caller holds the lock. *timer_moved: the deadline changed; 1 if a vector arrived. */
static int write_reg(struct hv_vcpu *v, struct hv_lapic *a, uint32_t off, uint32_t val,
                     int *timer_moved)
{
    uint64_t now = hv_system_time();
    int isrv;

    if (off == 0x2f0 || (off >= 0x320 && off < 0x380)) {
        int i = off == 0x2f0 ? LVT_CMCI : LVT_TIMER + (int)((off - 0x320) >> 4);
        uint32_t old_mode = a->lvt[LVT_TIMER] & LVT_TIMER_MODE;
        val &= lvt_writable[i];
        if (!(a->svr & SVR_ENABLED))
            val |= LVT_MASKED;      /* software-disabled: the LVT stays masked */
        a->lvt[i] = val;
        if (i == LVT_TIMER && (val & LVT_TIMER_MODE) != old_mode) {
            /* a mode switch stops the timer (SDM 11.5.4.1) */
            a->timer_initial = 0;
            a->tsc_deadline = 0;
            rearm(v, a, now);
            *timer_moved = 1;
        }
        return 0;
    }
    switch (off) {
    case 0x80:
        a->tpr = val & 0xff;
        return 0;
    case 0xb0:                      /* EOI: the highest vector in service is done */
        isrv = highest_bit(a->isr);
        if (isrv >= 0)
            clear_bit256(a->isr, isrv);
        return highest_bit(a->irr) >= 0;
    case 0xd0:
        a->ldr = val & 0xff000000u;
        return 0;
    case 0xe0:
        a->dfr = val | 0x0fffffffu;
        return 0;
    case 0xf0:
        a->svr = val & 0x13ff;
        if (!(a->svr & SVR_ENABLED))
            for (int i = 0; i < LVT_COUNT; i++)
                a->lvt[i] |= LVT_MASKED;
        return 0;
    case 0x280:                     /* a write latches the errors seen since */
        a->esr = a->esr_pending;
        a->esr_pending = 0;
        return 0;
    case 0x300:
        a->icr_low = val & ~(1u << 12);     /* delivery status: always idle */
        return send_ipi(a);
    case 0x310:
        a->icr_high = val & 0xff000000u;
        return 0;
    case 0x380:
        if ((a->lvt[LVT_TIMER] & LVT_TIMER_MODE) == LVT_TIMER_TSC_DL)
            return 0;               /* ignored in TSC-deadline mode */
        a->timer_initial = val;
        a->timer_start_ns = now;
        rearm(v, a, now);
        *timer_moved = 1;
        return 0;
    case 0x3e0:
        /* the count goes on at the new rate from here */
        a->timer_initial = timer_current(a, now);
        a->timer_start_ns = now;
        a->timer_divide = val & 0xb;
        if (a->timer_initial)
            rearm(v, a, now);
        *timer_moved = 1;
        return 0;
    default:
        return 0;                   /* read-only and reserved registers ignore writes */
    }
}

/* Wake the vCPU for a vector, move the timer: after the lock is let go. */
static void after_write(struct hv_vcpu *v, struct hv_lapic *a, int raised, int timer_moved)
{
    if (timer_moved) {
        uint64_t next;
        pthread_mutex_lock(&a->lock);
        next = a->timer_deadline;
        pthread_mutex_unlock(&a->lock);
        hv_timers_set_lapic(v, next);
    }
    if (raised)
        hv_vcpu_notify(v);
}

int hv_lapic_mmio(struct hv_vcpu *v, uint64_t gpa, int size, int is_write, uint8_t *data)
{
    struct hv_lapic *a = lapic_of(v);
    uint32_t off = (uint32_t)(gpa - HV_LAPIC_GPA), value;
    int raised = 0, timer_moved = 0;

    if (!a || gpa < HV_LAPIC_GPA || gpa >= HV_LAPIC_GPA + HV_PAGE_SIZE)
        return 0;
    /* xAPIC mode only, and registers are 32-bit at 16-byte strides: another size or
     * alignment reaches no register (reads 0, writes vanish), as in Xen */
    if ((a->apic_base & (APIC_BASE_ENABLE | APIC_BASE_X2APIC)) != APIC_BASE_ENABLE ||
        size != 4 || (off & 0xf)) {
        if (!is_write)
            memset(data, 0, (size_t)size);
        return 1;
    }
    pthread_mutex_lock(&a->lock);
    if (is_write) {
        memcpy(&value, data, 4);
        raised = write_reg(v, a, off, value, &timer_moved);
    } else {
        value = read_reg(a, off);
        memcpy(data, &value, 4);
    }
    pthread_mutex_unlock(&a->lock);
    after_write(v, a, raised, timer_moved);
    return 1;
}

/* ---- MSRs ---- */

int hv_lapic_rdmsr(struct hv_vcpu *v, uint32_t msr, uint64_t *value)
{
    struct hv_lapic *a = lapic_of(v);
    if (!a)
        return 0;
    switch (msr) {
    case MSR_APIC_BASE:
        *value = a->apic_base;
        return 1;
    case MSR_TSC_DEADLINE:
        pthread_mutex_lock(&a->lock);
        *value = a->tsc_deadline;
        pthread_mutex_unlock(&a->lock);
        return 1;
    default:
        return 0;
    }
}

int hv_lapic_wrmsr(struct hv_vcpu *v, uint32_t msr, uint64_t value)
{
    struct hv_lapic *a = lapic_of(v);
    int timer_moved = 0;
    if (!a)
        return 0;
    switch (msr) {
    case MSR_APIC_BASE:
        /* the base stays where Xen keeps it; x2APIC mode is not offered (CPUID says
         * so), so only the global enable may change */
        if ((value & ~(uint64_t)(APIC_BASE_ENABLE | APIC_BASE_BSP)) != HV_LAPIC_GPA ||
            (value & APIC_BASE_BSP) != (a->apic_base & APIC_BASE_BSP))
            return -1;
        a->apic_base = value;
        return 1;
    case MSR_TSC_DEADLINE:
        pthread_mutex_lock(&a->lock);
        if ((a->lvt[LVT_TIMER] & LVT_TIMER_MODE) == LVT_TIMER_TSC_DL) {
            a->tsc_deadline = value;
            rearm(v, a, hv_system_time());
            timer_moved = 1;
        }
        pthread_mutex_unlock(&a->lock);
        after_write(v, a, 0, timer_moved);
        return 1;
    default:
        return 0;
    }
}

/* ---- interrupts ---- */

void hv_lapic_set_irq(struct hv_vcpu *v, uint8_t vector)
{
    struct hv_lapic *a = lapic_of(v);
    if (!a)
        return;
    pthread_mutex_lock(&a->lock);
    accept(a, vector);
    pthread_mutex_unlock(&a->lock);
}

int hv_lapic_pending(struct hv_vcpu *v)
{
    struct hv_lapic *a = lapic_of(v);
    int vector = -1, irrv;
    if (!a)
        return -1;
    pthread_mutex_lock(&a->lock);
    irrv = highest_bit(a->irr);
    /* a disabled APIC delivers nothing; a vector must beat the processor priority */
    if ((a->apic_base & APIC_BASE_ENABLE) && (a->svr & SVR_ENABLED) && irrv >= 0 &&
        ((uint32_t)irrv & 0xf0) > (ppr(a) & 0xf0))
        vector = irrv;
    pthread_mutex_unlock(&a->lock);
    return vector;
}

void hv_lapic_accept(struct hv_vcpu *v, int vector)
{
    struct hv_lapic *a = lapic_of(v);
    if (!a || vector < 0 || vector > 255)
        return;
    pthread_mutex_lock(&a->lock);
    clear_bit256(a->irr, vector);
    set_bit256(a->isr, vector);
    pthread_mutex_unlock(&a->lock);
}
