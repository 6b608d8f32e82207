/*
 * dev_rtc.c - the CMOS real-time clock (MC146818): index port 0x70, data port 0x71.
 *
 * The time and date registers read the device clock's wall time (UTC) at the moment of
 * the read, in BCD unless register B selects binary, with a 12-hour clock unless it
 * selects 24 hours (a PC BIOS leaves it BCD, 24 hours). Register A's update-in-progress
 * bit is set for the last 244 us of each second, as on the chip, so a guest that checks
 * it reads a consistent time. Writes to the time registers are ignored (the clock
 * follows the host's); every other byte of the 128 is NVRAM that keeps what is written.
 * Bit 7 of the index (the PC's NMI mask) is accepted and has no effect.
 */
#include <time.h>

#include "hv.h"

enum {
    REG_SEC = 0x00, REG_MIN = 0x02, REG_HOUR = 0x04, REG_WDAY = 0x06,
    REG_MDAY = 0x07, REG_MON = 0x08, REG_YEAR = 0x09,
    REG_A = 0x0a, REG_B = 0x0b, REG_C = 0x0c, REG_D = 0x0d,
    REG_CENTURY = 0x32,
};

#define A_UIP       0x80
#define B_24H       0x02
#define B_BINARY    0x04
#define D_VRT       0x80            /* valid RAM and time */
#define UIP_NS      244000ULL

void hv_rtc_reset(struct hv_rtc *r)
{
    *r = (struct hv_rtc){ 0 };
    r->ram[REG_A] = 0x26;           /* 32.768 kHz time base, 1024 Hz periodic rate */
    r->ram[REG_B] = B_24H;
    r->ram[REG_D] = D_VRT;
}

static uint8_t encode(const struct hv_rtc *r, int value)
{
    if (r->ram[REG_B] & B_BINARY)
        return (uint8_t)value;
    return (uint8_t)(((value / 10) << 4) | (value % 10));
}

static uint8_t hour_register(const struct hv_rtc *r, int hour)
{
    int pm;
    if (r->ram[REG_B] & B_24H)
        return encode(r, hour);
    pm = hour >= 12;
    hour %= 12;
    return (uint8_t)(encode(r, hour ? hour : 12) | (pm ? 0x80 : 0));
}

static uint8_t time_register(struct hv_devices *dev, int reg)
{
    const struct hv_rtc *r = &dev->rtc;
    uint64_t wall = hv_dev_wall_ns(dev);
    time_t secs = (time_t)(wall / 1000000000ULL);
    struct tm tm;

    gmtime_r(&secs, &tm);
    switch (reg) {
    case REG_SEC:     return encode(r, tm.tm_sec);
    case REG_MIN:     return encode(r, tm.tm_min);
    case REG_HOUR:    return hour_register(r, tm.tm_hour);
    case REG_WDAY:    return encode(r, tm.tm_wday + 1);     /* 1 = Sunday */
    case REG_MDAY:    return encode(r, tm.tm_mday);
    case REG_MON:     return encode(r, tm.tm_mon + 1);
    case REG_YEAR:    return encode(r, (tm.tm_year + 1900) % 100);
    case REG_CENTURY: return encode(r, (tm.tm_year + 1900) / 100);
    case REG_A:
        return (uint8_t)((r->ram[REG_A] & 0x7f) |
                         (wall % 1000000000ULL >= 1000000000ULL - UIP_NS ? A_UIP : 0));
    }
    return r->ram[reg];
}

static int is_clock_register(int reg)
{
    return reg == REG_SEC || reg == REG_MIN || reg == REG_HOUR || reg == REG_WDAY ||
           reg == REG_MDAY || reg == REG_MON || reg == REG_YEAR || reg == REG_CENTURY;
}

uint8_t hv_rtc_read(struct hv_devices *dev, int offset)
{
    struct hv_rtc *r = &dev->rtc;
    uint8_t val;

    if (offset == 0)
        return 0xff;                /* the index port is write-only */
    dev->stats.rtc_reads++;
    if (is_clock_register(r->index) || r->index == REG_A)
        return time_register(dev, r->index);
    val = r->ram[r->index];
    if (r->index == REG_C)
        r->ram[REG_C] = 0;          /* reading C acknowledges its (never raised) flags */
    return val;
}

void hv_rtc_write(struct hv_devices *dev, int offset, uint8_t val)
{
    struct hv_rtc *r = &dev->rtc;

    if (offset == 0) {
        r->index = val & 0x7f;
        return;
    }
    if (is_clock_register(r->index) || r->index == REG_C || r->index == REG_D)
        return;                     /* the clock follows the host; C and D are read-only */
    if (r->index == REG_A)
        val &= 0x7f;                /* UIP is read-only */
    r->ram[r->index] = val;
}
