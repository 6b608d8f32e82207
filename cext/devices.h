/*
 * devices.h - the emulated PC hardware of a native domain: the state of each device model
 * and the bus (devices.c) that routes port I/O, trapped page-table writes and interrupts.
 *
 * One lock per domain guards every device: the vCPU thread takes it on each port access,
 * the timer thread when the PIT's output changes, Python when it reads the counters.
 * Lock order: wait_lock, then the device lock; nothing else is taken
 * while it is held, so a device that must wake the vCPU does so after letting it go.
 */
#ifndef TRAPLESS_DEVICES_H
#define TRAPLESS_DEVICES_H
#include <pthread.h>
#include <stdint.h>

#include "hv_api.h"

struct hv_domain;
struct hv_vcpu;

/* ---- UART 16550 (dev_uart.c) ---- */
struct hv_uart {
    uint8_t ier, lcr, mcr, scr, fcr;
    uint8_t dll, dlm;               /* divisor latch, reached with LCR.DLAB */
    uint8_t thre_pending;           /* the "transmitter empty" interrupt is owed */
    uint8_t irq_level;              /* what the UART drives on its IRQ line */
};

/* ---- PIT 8254 (dev_pit.c) ---- */
struct hv_pit_channel {
    uint32_t reload;                /* 1..65536 (a written 0 means 65536) */
    uint8_t  mode, access, bcd;     /* from the control word */
    uint8_t  armed;                 /* a count has been loaded: the counter runs */
    uint8_t  write_high;            /* lo/hi access: the next write is the high byte */
    uint8_t  read_high;             /* lo/hi access: the next read is the high byte */
    uint8_t  write_low;             /* the low byte, kept until the high byte arrives */
    uint8_t  count_latched;         /* a latch command froze `latch` */
    uint8_t  latch_high;            /* lo/hi: the latch's low byte has been read */
    uint8_t  status_latched;
    uint8_t  status;
    uint16_t latch;
    uint64_t load_ns;               /* device-clock time the count was loaded */
    uint64_t edges;                 /* rising edges of OUT already raised (channel 0) */
};

struct hv_pit {
    struct hv_pit_channel ch[3];
};

/* ---- PIC 8259 pair (dev_pic.c) ---- */
struct hv_pic_chip {
    uint8_t irr, isr, imr;
    uint8_t lines;                  /* input levels, for edge detection */
    uint8_t vector_base;            /* ICW2 */
    uint8_t init_step;              /* 0 ready; 2, 3, 4: the ICW expected next */
    uint8_t need_icw4, single, auto_eoi, icw3;
    uint8_t read_isr;               /* OCW3: the command port reads ISR, else IRR */
    uint8_t poll;                   /* OCW3: the next command-port read is a poll */
    uint8_t special_mask;
    uint8_t lowest;                 /* the input with the lowest priority (rotation) */
};

struct hv_pic {
    struct hv_pic_chip chip[2];     /* master (0x20, IRQ 0-7), slave (0xA0, IRQ 8-15 on IR2) */
};

/* ---- CMOS RTC (dev_rtc.c) ---- */
struct hv_rtc {
    uint8_t index;                  /* selected register */
    uint8_t ram[128];               /* registers A-D, alarms and NVRAM; time comes from the clock */
};

/* ---- local APIC of a PVH vCPU (dev_lapic.c) ---- */
struct hv_lapic {
    pthread_mutex_t lock;           /* the vCPU, the timer thread and event senders */
    uint32_t id;                    /* the vCPU id */
    uint32_t tpr, ldr, dfr, svr, esr, esr_pending;
    uint32_t icr_low, icr_high;
    uint32_t lvt[7];                /* CMCI, timer, thermal, perf, LINT0, LINT1, error */
    uint32_t irr[8], isr[8], tmr[8];
    uint32_t timer_initial, timer_divide;
    uint64_t timer_start_ns;        /* system time the count was loaded (or last reloaded) */
    uint64_t timer_deadline;        /* system time of the next expiry; 0: not armed */
    uint64_t tsc_deadline;          /* IA32_TSC_DEADLINE as the guest wrote it */
    uint64_t apic_base;             /* IA32_APIC_BASE */
};

/* The device clock: the host's, or frozen by a test (hv_devices_set_clock). */
struct hv_dev_clock {
    uint64_t frozen_mono_ns, frozen_wall_ns;    /* 0: use the host clocks */
};

struct hv_devices {
    pthread_mutex_t lock;
    struct hv_domain *dom;
    struct hv_dev_clock clock;
    struct hv_uart uart;
    struct hv_pit pit;
    struct hv_pic pic;
    struct hv_rtc rtc;
    struct hv_device_stats stats;
    int wake_timer;                 /* the PIT's next edge moved: tell the timer thread */
};

/* Device clock, in ns: monotonic (system time) and wall (since the epoch, UTC). */
uint64_t hv_dev_mono_ns(struct hv_devices *dev);
uint64_t hv_dev_wall_ns(struct hv_devices *dev);

/* Each model: reset state, and port access at `offset` from its base (caller holds the
 * lock; one byte at a time, the width is checked by the bus). */
void    hv_uart_reset(struct hv_uart *u);
uint8_t hv_uart_read(struct hv_devices *dev, int offset);
void    hv_uart_input_arrived(struct hv_devices *dev);
void    hv_uart_write(struct hv_devices *dev, int offset, uint8_t val);

void    hv_pit_reset(struct hv_pit *p);
uint8_t hv_pit_read(struct hv_devices *dev, int offset);
void    hv_pit_write(struct hv_devices *dev, int offset, uint8_t val);
/* Raise channel 0's due edges on IRQ0; returns the device-clock time of the next edge
 * (HV_NO_DEADLINE if none) and sets *raised if any were raised. */
uint64_t hv_pit_advance(struct hv_devices *dev, uint64_t now, int *raised);

void    hv_pic_reset(struct hv_pic *p);
uint8_t hv_pic_read(struct hv_devices *dev, int chip, int offset);
void    hv_pic_write(struct hv_devices *dev, int chip, int offset, uint8_t val);
/* Drive an input line (IRQ 0-15); a rising edge sets its request bit. */
void    hv_pic_set_irq(struct hv_devices *dev, int irq, int level);
int     hv_pic_vector(struct hv_pic *p);              /* -1: nothing for the CPU */
void    hv_pic_acknowledge(struct hv_devices *dev, int vector);

void    hv_rtc_reset(struct hv_rtc *r);
uint8_t hv_rtc_read(struct hv_devices *dev, int offset);
void    hv_rtc_write(struct hv_devices *dev, int offset, uint8_t val);

/* The exit port (dev_exit.c): the value written is the Xen shutdown reason. */
void    hv_exit_port_write(struct hv_devices *dev, uint32_t val);

/* Trapped page-table writes (dev_ptw.c): 1 if emulated (or the domain crashed over it). */
int     hv_ptw_write(struct hv_devices *dev, uint64_t gpa, int size, const uint8_t *data);

/* The local APIC (dev_lapic.c). An access is 1 (handled) or 0 (not the LAPIC's). */
int      hv_lapic_init(struct hv_vcpu *v);
void     hv_lapic_destroy(struct hv_vcpu *v);
int      hv_lapic_mmio(struct hv_vcpu *v, uint64_t gpa, int size, int is_write, uint8_t *data);
int      hv_lapic_rdmsr(struct hv_vcpu *v, uint32_t msr, uint64_t *value);
int      hv_lapic_wrmsr(struct hv_vcpu *v, uint32_t msr, uint64_t value);    /* -1: #GP */
void     hv_lapic_set_irq(struct hv_vcpu *v, uint8_t vector);   /* edge, fixed delivery */
int      hv_lapic_pending(struct hv_vcpu *v);                   /* -1: nothing to take */
void     hv_lapic_accept(struct hv_vcpu *v, int vector);        /* IRR -> ISR */
void     hv_lapic_timer_expired(struct hv_vcpu *v, uint64_t now);   /* the timer thread */

/* In mm.c: one validated page-table entry write, as one MMU_NORMAL_PT_UPDATE. */
int     hv_mm_write_pte(struct hv_domain *d, uint64_t gpa, uint64_t val);

/* In devices.c, called by the timer thread (no lock held): raise what the device
 * clock says is due; returns the next deadline in system time (HV_NO_DEADLINE: none). */
uint64_t hv_devices_timer(struct hv_domain *d);

#endif
