/*
 * devices.c - the device bus of a native (unmodified) guest: routes its port I/O to the
 * device models (UART, PIT, PIC, RTC, exit port), its trapped page-table writes to the
 * memory service, and the PIC's interrupts to the CPU.
 *
 * A domain built without devices (every PV domain) has none: every port is unclaimed
 * (reads float high, writes vanish; the run loop counts them) and every access outside
 * RAM is a fault. With devices, a port no model owns behaves the same way; an access
 * of the wrong width to a device register is ignored the same way (reads all-ones) and
 * counted as bad_width. Nothing a guest writes can crash the host.
 *
 * Work that takes other locks (waking the vCPU, shutting the domain down, waking the
 * timer thread) is collected while the device lock is held and done after it is let go.
 */
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include "hv.h"

/* What one bus access asks to be done once the device lock is released. */
struct after {
    int had_vector;             /* an interrupt was pending before the access */
    int wake_timer;             /* the PIT's next edge moved */
};

uint64_t hv_dev_mono_ns(struct hv_devices *dev)
{
    return dev->clock.frozen_mono_ns ? dev->clock.frozen_mono_ns : hv_system_time();
}

uint64_t hv_dev_wall_ns(struct hv_devices *dev)
{
    struct timespec ts;
    if (dev->clock.frozen_wall_ns)
        return dev->clock.frozen_wall_ns;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + (uint64_t)ts.tv_nsec;
}

static struct hv_devices *devices_of(struct hv_domain *d)
{
    return __atomic_load_n(&d->devices, __ATOMIC_ACQUIRE);
}

static void wake_timer_thread(struct hv_domain *d)
{
    hv_timers_wake(d);
}

static void start(struct hv_devices *dev, struct after *after)
{
    pthread_mutex_lock(&dev->lock);
    after->had_vector = hv_pic_vector(&dev->pic) >= 0;
}

/* Let the lock go; then wake the timer thread, and the vCPU if an interrupt appeared
 * (from its own thread that only matters to a test driving the bus directly). */
static void finish(struct hv_devices *dev, struct after *after)
{
    struct hv_domain *d = dev->dom;
    int notify = !after->had_vector && hv_pic_vector(&dev->pic) >= 0;
    after->wake_timer = dev->wake_timer;
    dev->wake_timer = 0;
    pthread_mutex_unlock(&dev->lock);
    if (after->wake_timer)
        wake_timer_thread(d);
    if (notify && d->vcpus[0])
        hv_vcpu_notify(d->vcpus[0]);
}

/* ---- port I/O ---- */

enum { DEV_NONE = -1 };

/* Which model owns a port, and the register offset within it. */
static int route(uint16_t port, int *offset)
{
    if (port >= HV_UART_PORT && port < HV_UART_PORT + 8) {
        *offset = port - HV_UART_PORT;
        return HV_DEV_UART;
    }
    if (port >= HV_PIT_PORT && port < HV_PIT_PORT + 4) {
        *offset = port - HV_PIT_PORT;
        return HV_DEV_PIT;
    }
    if (port == HV_PIC_MASTER_PORT || port == HV_PIC_MASTER_PORT + 1) {
        *offset = port - HV_PIC_MASTER_PORT;
        return HV_DEV_PIC;
    }
    if (port == HV_PIC_SLAVE_PORT || port == HV_PIC_SLAVE_PORT + 1) {
        *offset = 2 + port - HV_PIC_SLAVE_PORT;     /* 2, 3: the slave's registers */
        return HV_DEV_PIC;
    }
    if (port == HV_RTC_PORT || port == HV_RTC_PORT + 1) {
        *offset = port - HV_RTC_PORT;
        return HV_DEV_RTC;
    }
    if (port == HV_EXIT_PORT) {
        *offset = 0;
        return HV_DEV_EXIT;
    }
    return DEV_NONE;
}

static uint8_t read_byte(struct hv_devices *dev, int which, int offset)
{
    switch (which) {
    case HV_DEV_UART: return hv_uart_read(dev, offset);
    case HV_DEV_PIT:  return hv_pit_read(dev, offset);
    case HV_DEV_PIC:  return hv_pic_read(dev, offset / 2, offset % 2);
    case HV_DEV_RTC:  return hv_rtc_read(dev, offset);
    }
    return 0xff;                /* the exit port is write-only */
}

static void write_byte(struct hv_devices *dev, int which, int offset, uint8_t val)
{
    switch (which) {
    case HV_DEV_UART: hv_uart_write(dev, offset, val); break;
    case HV_DEV_PIT:  hv_pit_write(dev, offset, val); break;
    case HV_DEV_PIC:  hv_pic_write(dev, offset / 2, offset % 2, val); break;
    case HV_DEV_RTC:  hv_rtc_write(dev, offset, val); break;
    }
}

/* One access; 1 if a device model owns the port. data holds size bytes, little-endian. */
static int bus_port_io(struct hv_devices *dev, uint16_t port, int size, int is_write, uint8_t *data)
{
    struct after after = { 0 };
    int offset, which = route(port, &offset);
    uint32_t value = 0;

    if (which == DEV_NONE)
        return 0;
    if (which == HV_DEV_EXIT) {
        /* Any width: the value is the shutdown reason (isa-debug-exit style). */
        if (!is_write) {
            memset(data, 0xff, (size_t)size);
            return 1;
        }
        memcpy(&value, data, (size_t)(size < 4 ? size : 4));
        pthread_mutex_lock(&dev->lock);
        dev->stats.port_io[HV_DEV_EXIT]++;
        pthread_mutex_unlock(&dev->lock);
        hv_exit_port_write(dev, value);
        return 1;
    }
    start(dev, &after);
    if (size != 1) {
        /* Every register of these chips is one byte wide: a wider access reaches no
         * register. Ignored, reads float high, counted. */
        dev->stats.bad_width++;
        if (!is_write)
            memset(data, 0xff, (size_t)size);
    } else {
        dev->stats.port_io[which]++;
        if (is_write)
            write_byte(dev, which, offset, data[0]);
        else
            data[0] = read_byte(dev, which, offset);
    }
    finish(dev, &after);
    return 1;
}

int hv_devices_port_io(struct hv_vcpu *v, uint16_t port, int size, int is_write, uint8_t *data)
{
    struct hv_devices *dev = devices_of(v->dom);
    if (!dev)
        return hv_pvh_port_io(v, port, size, is_write, data);  /* PVH: its ACPI registers */
    return bus_port_io(dev, port, size, is_write, data);
}

/* ---- memory-mapped accesses: only the page-table pool's trapped writes ---- */

int hv_devices_mmio(struct hv_vcpu *v, uint64_t gpa, int size, int is_write, uint8_t *data)
{
    struct hv_domain *d = v->dom;
    struct hv_devices *dev = devices_of(d);

    if (!dev || !is_write || gpa < d->pt_pool_start || gpa >= d->pt_pool_end)
        return 0;
    return hv_ptw_write(dev, gpa, size, data);
}

/* ---- interrupts ---- */

int hv_devices_irq_vector(struct hv_domain *d)
{
    struct hv_devices *dev = devices_of(d);
    int vector;
    if (!dev)
        return -1;
    pthread_mutex_lock(&dev->lock);
    vector = hv_pic_vector(&dev->pic);
    pthread_mutex_unlock(&dev->lock);
    return vector;
}

void hv_devices_irq_injected(struct hv_domain *d, int vector)
{
    struct hv_devices *dev = devices_of(d);
    if (!dev)
        return;
    pthread_mutex_lock(&dev->lock);
    hv_pic_acknowledge(dev, vector);
    pthread_mutex_unlock(&dev->lock);
}

/* Console input was queued (console.c): the UART may raise its receive interrupt. */
void hv_devices_console_input(struct hv_domain *d)
{
    struct hv_devices *dev = devices_of(d);
    struct after after;
    if (!dev)
        return;
    start(dev, &after);
    hv_uart_input_arrived(dev);
    finish(dev, &after);
}

/* ---- the device timer (called from timers.c's thread) ---- */

uint64_t hv_devices_timer(struct hv_domain *d)
{
    struct hv_devices *dev = devices_of(d);
    uint64_t next;
    int raised = 0, frozen;

    if (!dev)
        return HV_NO_DEADLINE;
    pthread_mutex_lock(&dev->lock);
    next = hv_pit_advance(dev, hv_dev_mono_ns(dev), &raised);
    dev->wake_timer = 0;
    frozen = dev->clock.frozen_mono_ns != 0;
    pthread_mutex_unlock(&dev->lock);
    if (raised && d->vcpus[0])
        hv_vcpu_notify(d->vcpus[0]);
    /* A frozen clock moves only when a test moves it (and wakes us). */
    return frozen ? HV_NO_DEADLINE : next;
}

/* ---- life cycle and the Python-facing API ---- */

int hv_domain_add_devices(struct hv_domain *d, char *err, int err_len)
{
    struct hv_devices *dev;

    if (devices_of(d)) {
        hv_set_error(err, err_len, "the domain already has its devices");
        return -1;
    }
    dev = calloc(1, sizeof(*dev));
    if (!dev) {
        hv_set_error(err, err_len, "out of host memory");
        return -1;
    }
    pthread_mutex_init(&dev->lock, NULL);
    dev->dom = d;
    hv_uart_reset(&dev->uart);
    hv_pit_reset(&dev->pit);
    hv_pic_reset(&dev->pic);
    hv_rtc_reset(&dev->rtc);
    __atomic_store_n(&d->devices, dev, __ATOMIC_RELEASE);
    return 0;
}

void hv_devices_destroy(struct hv_domain *d)
{
    struct hv_devices *dev = devices_of(d);
    if (!dev)
        return;
    __atomic_store_n(&d->devices, NULL, __ATOMIC_RELEASE);
    pthread_mutex_destroy(&dev->lock);
    free(dev);
}

int hv_domain_device_stats(struct hv_domain *d, struct hv_device_stats *out)
{
    struct hv_devices *dev = devices_of(d);
    if (!dev)
        return -1;
    pthread_mutex_lock(&dev->lock);
    *out = dev->stats;
    pthread_mutex_unlock(&dev->lock);
    return 0;
}

int hv_devices_port(struct hv_domain *d, uint16_t port, int size, int is_write, uint32_t *value)
{
    struct hv_devices *dev = devices_of(d);
    uint8_t data[4];
    int claimed;

    if (!dev || (size != 1 && size != 2 && size != 4))
        return -1;
    memcpy(data, value, 4);
    claimed = bus_port_io(dev, port, size, is_write, data);
    if (!claimed && !is_write)
        memset(data, 0xff, (size_t)size);       /* as the run loop answers for nobody */
    if (!is_write) {
        *value = 0;
        memcpy(value, data, (size_t)size);
    }
    return claimed;
}

int hv_devices_mmio_write(struct hv_domain *d, uint64_t gpa, int size, uint64_t value)
{
    struct hv_devices *dev = devices_of(d);
    uint8_t data[8];
    if (!dev || size < 1 || size > 8)
        return -1;
    memcpy(data, &value, sizeof(data));
    if (gpa < d->pt_pool_start || gpa >= d->pt_pool_end)
        return 0;
    return hv_ptw_write(dev, gpa, size, data);
}

int hv_devices_pending_vector(struct hv_domain *d)
{
    return hv_devices_irq_vector(d);
}

void hv_devices_ack_vector(struct hv_domain *d, int vector)
{
    hv_devices_irq_injected(d, vector);
}

void hv_devices_set_clock(struct hv_domain *d, uint64_t mono_ns, uint64_t wall_ns)
{
    struct hv_devices *dev = devices_of(d);
    if (!dev)
        return;
    pthread_mutex_lock(&dev->lock);
    dev->clock.frozen_mono_ns = mono_ns;
    dev->clock.frozen_wall_ns = wall_ns;
    pthread_mutex_unlock(&dev->lock);
    wake_timer_thread(d);           /* the PIT's edges may be due now */
}
