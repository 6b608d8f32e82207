/*
 * dev_pit.c - the 8254 programmable interval timer: three 16-bit down-counters at
 * 1.193182 MHz, data ports 0x40-0x42, control word at 0x43. Channel 0's output drives
 * IRQ0 on the PIC.
 *
 * A counter is not stepped: its value is computed from the device clock and the time
 * its count was loaded, and the timer thread raises IRQ0 at each rising edge of
 * channel 0's output (hv_pit_advance). Modes 2 (rate generator) and 3 (square wave)
 * repeat with period = count / 1.193182 MHz; mode 0 (interrupt on terminal count) rises
 * once; the other modes count but raise nothing (their gate trigger is not wired).
 * The access sequences are the chip's: lo, hi, or lo-then-hi with a flip-flop, the
 * counter-latch command and the read-back command (count and status). Counting is
 * binary; the BCD bit is kept and reported, not honoured.
 */
#include "hv.h"

#define NS_PER_SEC      1000000000ULL
#define MIN_EDGE_NS     100000ULL   /* edges closer than this are merged (see advance) */

enum { ACCESS_LATCH = 0, ACCESS_LO = 1, ACCESS_HI = 2, ACCESS_LOHI = 3 };

void hv_pit_reset(struct hv_pit *p)
{
    for (int i = 0; i < 3; i++)
        p->ch[i] = (struct hv_pit_channel){ .reload = 65536, .access = ACCESS_LOHI };
}

/* Modes 6 and 7 are 2 and 3 again. */
static int mode_of(const struct hv_pit_channel *c)
{
    return c->mode > 5 ? c->mode - 4 : c->mode;
}

static int periodic(const struct hv_pit_channel *c)
{
    return mode_of(c) == 2 || mode_of(c) == 3;
}

/* Input clock ticks since the count was loaded. */
static uint64_t ticks_since_load(const struct hv_pit_channel *c, uint64_t now)
{
    if (now <= c->load_ns)
        return 0;
    return (uint64_t)(((unsigned __int128)(now - c->load_ns) * HV_PIT_HZ) / NS_PER_SEC);
}

/* Device-clock time of input tick `ticks` after the load (rounded up). */
static uint64_t time_of_tick(const struct hv_pit_channel *c, uint64_t ticks)
{
    return c->load_ns +
        (uint64_t)(((unsigned __int128)ticks * NS_PER_SEC + HV_PIT_HZ - 1) / HV_PIT_HZ);
}

static uint16_t current_count(const struct hv_pit_channel *c, uint64_t now)
{
    uint64_t t = ticks_since_load(c, now), n = c->reload;

    if (!c->armed)
        return (uint16_t)n;
    switch (mode_of(c)) {
    case 2:                         /* n, n-1, ..., 1, then n again */
        return (uint16_t)(n - t % n);
    case 3: {                       /* down by two, twice per period */
        uint64_t half = n / 2 ? n / 2 : 1;
        return (uint16_t)((n & ~1ULL) - 2 * (t % half));
    }
    default:                        /* n down to 0, then on from 0xffff */
        return (uint16_t)(n - t);
    }
}

static int output_high(const struct hv_pit_channel *c, uint64_t now)
{
    uint64_t t = ticks_since_load(c, now), n = c->reload;
    if (!c->armed)
        return mode_of(c) != 0;
    switch (mode_of(c)) {
    case 2:
        return t % n != n - 1;      /* low for the last tick of each period */
    case 3:
        return t % n < (n + 1) / 2; /* high for the first half */
    case 0:
        return t >= n;              /* rises at terminal count */
    }
    return 1;
}

/* Rising edges of OUT from the load up to now. */
static uint64_t edges_until(const struct hv_pit_channel *c, uint64_t now)
{
    uint64_t t = ticks_since_load(c, now);
    if (!c->armed)
        return 0;
    if (periodic(c))
        return t / c->reload;       /* one per period, at each reload */
    if (mode_of(c) == 0)
        return t >= c->reload;
    return 0;
}

uint64_t hv_pit_advance(struct hv_devices *dev, uint64_t now, int *raised)
{
    struct hv_pit_channel *c = &dev->pit.ch[0];
    uint64_t edges = edges_until(c, now), next;

    if (edges > c->edges) {
        /* However many edges passed, an edge-triggered request bit holds one. */
        dev->stats.pit_edges += edges - c->edges;
        c->edges = edges;
        hv_pic_set_irq(dev, 0, 1);
        hv_pic_set_irq(dev, 0, 0);
        *raised = 1;
    }
    if (!c->armed || (!periodic(c) && (mode_of(c) != 0 || c->edges)))
        return HV_NO_DEADLINE;
    next = time_of_tick(c, periodic(c) ? (c->edges + 1) * c->reload : c->reload);
    /* A guest asking for edges faster than the host can wake (counts near 1) gets them
     * merged, as a busy CPU would leave them merged in the PIC. */
    if (next < now + MIN_EDGE_NS)
        next = now + MIN_EDGE_NS;
    return next;
}

static uint8_t status_byte(const struct hv_pit_channel *c, uint64_t now)
{
    return (uint8_t)((output_high(c, now) ? 0x80 : 0) | (c->armed ? 0 : 0x40) |
                     (c->access << 4) | (c->mode << 1) | c->bcd);
}

static void latch_count(struct hv_pit_channel *c, uint64_t now)
{
    if (c->count_latched)
        return;                     /* a second latch before the first is read: ignored */
    c->latch = current_count(c, now);
    c->count_latched = 1;
    c->latch_high = 0;
}

static void control_word(struct hv_devices *dev, uint8_t val)
{
    uint64_t now = hv_dev_mono_ns(dev);
    int sel = val >> 6, access = (val >> 4) & 3;
    struct hv_pit_channel *c;

    if (sel == 3) {                 /* read-back: bit 5 clear latches counts, bit 4 status */
        for (int i = 0; i < 3; i++) {
            if (!(val & (2 << i)))
                continue;
            c = &dev->pit.ch[i];
            if (!(val & 0x20))
                latch_count(c, now);
            if (!(val & 0x10) && !c->status_latched) {
                c->status = status_byte(c, now);
                c->status_latched = 1;
            }
        }
        return;
    }
    c = &dev->pit.ch[sel];
    if (access == ACCESS_LATCH) {
        latch_count(c, now);
        return;
    }
    /* A new mode stops the counter until a count is written. */
    c->access = (uint8_t)access;
    c->mode = (val >> 1) & 7;
    c->bcd = val & 1;
    c->armed = 0;
    c->write_high = c->read_high = 0;
    c->count_latched = c->status_latched = 0;
    if (sel == 0)
        dev->wake_timer = 1;
}

static void load_count(struct hv_devices *dev, struct hv_pit_channel *c, uint32_t count, int index)
{
    c->reload = count ? count : 65536;
    c->armed = 1;
    c->load_ns = hv_dev_mono_ns(dev);
    c->edges = 0;
    if (index == 0)
        dev->wake_timer = 1;
}

void hv_pit_write(struct hv_devices *dev, int offset, uint8_t val)
{
    struct hv_pit_channel *c;

    if (offset == 3) {
        control_word(dev, val);
        return;
    }
    c = &dev->pit.ch[offset];
    switch (c->access) {
    case ACCESS_LO:
        load_count(dev, c, val, offset);
        break;
    case ACCESS_HI:
        load_count(dev, c, (uint32_t)val << 8, offset);
        break;
    case ACCESS_LOHI:
        if (!c->write_high) {
            c->write_low = val;
            c->write_high = 1;
            c->armed = 0;           /* between the two bytes the count is undefined */
        } else {
            c->write_high = 0;
            load_count(dev, c, c->write_low | ((uint32_t)val << 8), offset);
        }
        break;
    }
}

/* One byte of a 16-bit value per the access mode; *high is the lo/hi flip-flop.
 * Returns 1 when the value has been read out completely. */
static uint8_t byte_of(uint16_t value, int access, uint8_t *high, int *done)
{
    switch (access) {
    case ACCESS_LO:
        *done = 1;
        return (uint8_t)value;
    case ACCESS_HI:
        *done = 1;
        return (uint8_t)(value >> 8);
    }
    if (!*high) {
        *high = 1;
        *done = 0;
        return (uint8_t)value;
    }
    *high = 0;
    *done = 1;
    return (uint8_t)(value >> 8);
}

uint8_t hv_pit_read(struct hv_devices *dev, int offset)
{
    struct hv_pit_channel *c;
    int done;
    uint8_t val;

    if (offset == 3)
        return 0xff;                /* the control word cannot be read */
    c = &dev->pit.ch[offset];
    if (c->status_latched) {
        c->status_latched = 0;
        return c->status;
    }
    if (c->count_latched) {
        val = byte_of(c->latch, c->access, &c->latch_high, &done);
        if (done)
            c->count_latched = 0;
        return val;
    }
    return byte_of(current_count(c, hv_dev_mono_ns(dev)), c->access, &c->read_high, &done);
}
