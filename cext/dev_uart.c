/*
 * dev_uart.c - a 16550 UART at COM1 (0x3F8, IRQ 4): the native guest's console.
 *
 * Transmit is instant: a byte written to THR goes straight to the domain's console fd
 * (the same stream console_io writes), so THR is always empty and LSR always says so.
 * Receive takes bytes the toolstack queued for the console (hv_domain_console_input).
 * Enough of the chip for a polled driver (poll LSR, write THR) and an interrupt-driven
 * one (IER, IIR with the THRE and received-data sources, the IRQ line on the PIC).
 * The divisor latch (LCR.DLAB), MCR, MSR and the scratch register hold what is
 * written; line speed means nothing here.
 */
#include <errno.h>
#include <unistd.h>

#include "hv.h"

enum {                              /* register offsets from the base */
    REG_DATA = 0,                   /* RBR (read) / THR (write); DLL with DLAB */
    REG_IER = 1,                    /* DLM with DLAB */
    REG_IIR = 2,                    /* IIR (read) / FCR (write) */
    REG_LCR = 3,
    REG_MCR = 4,
    REG_LSR = 5,
    REG_MSR = 6,
    REG_SCR = 7,
};

#define IER_RX      0x01            /* received data available */
#define IER_THRE    0x02            /* transmitter holding register empty */
#define IIR_NONE    0x01
#define IIR_THRE    0x02
#define IIR_RX      0x04
#define IIR_FIFO    0xc0            /* FIFOs enabled (FCR bit 0) */
#define LCR_DLAB    0x80
#define LSR_DR      0x01
#define LSR_THRE    0x20
#define LSR_TEMT    0x40
#define MCR_OUT2    0x08
#define MSR_IDLE    0xb0            /* DCD, DSR, CTS: a terminal is attached */

void hv_uart_reset(struct hv_uart *u)
{
    *u = (struct hv_uart){ .dll = 0x0c };    /* 9600 baud, as a PC BIOS leaves it */
}

static int rx_ready(struct hv_domain *d)
{
    int ready;
    pthread_mutex_lock(&d->console_lock);
    ready = d->console_in_cons != d->console_in_prod;
    pthread_mutex_unlock(&d->console_lock);
    return ready;
}

static int rx_take(struct hv_domain *d, uint8_t *byte)
{
    int got = 0;
    pthread_mutex_lock(&d->console_lock);
    if (d->console_in_cons != d->console_in_prod) {
        *byte = d->console_in[d->console_in_cons++ & (HV_CONSOLE_IN - 1)];
        got = 1;
    }
    pthread_mutex_unlock(&d->console_lock);
    return got;
}

/* The highest-priority interrupt source the UART reports, as IIR's low bits. */
static uint8_t pending_source(struct hv_devices *dev)
{
    struct hv_uart *u = &dev->uart;
    if ((u->ier & IER_RX) && rx_ready(dev->dom))
        return IIR_RX;
    if ((u->ier & IER_THRE) && u->thre_pending)
        return IIR_THRE;
    return IIR_NONE;
}

/* As on a PC, the interrupt reaches the PIC only while MCR.OUT2 is set. */
static void update_irq(struct hv_devices *dev)
{
    int level = (dev->uart.mcr & MCR_OUT2) && pending_source(dev) != IIR_NONE;
    dev->uart.irq_level = (uint8_t)level;
    hv_pic_set_irq(dev, HV_UART_IRQ, level);
}

/* The toolstack queued console input: the data-ready interrupt may rise now, so a
 * guest idling in hlt wakes for it (devices.c calls this under the devices lock). */
void hv_uart_input_arrived(struct hv_devices *dev)
{
    update_irq(dev);
}

static void transmit(struct hv_devices *dev, uint8_t byte)
{
    int fd = dev->dom->console_fd;
    dev->stats.uart_tx_bytes++;
    while (fd >= 0) {
        ssize_t n = write(fd, &byte, 1);
        if (n == 1 || (n < 0 && errno != EINTR))
            break;              /* sent, or the reader went away: the byte is lost */
    }
}

uint8_t hv_uart_read(struct hv_devices *dev, int offset)
{
    struct hv_uart *u = &dev->uart;
    uint8_t val = 0xff, byte, source;

    switch (offset) {
    case REG_DATA:
        if (u->lcr & LCR_DLAB)
            return u->dll;
        val = 0;
        if (rx_take(dev->dom, &byte)) {
            val = byte;
            dev->stats.uart_rx_bytes++;
        }
        update_irq(dev);
        return val;
    case REG_IER:
        return (u->lcr & LCR_DLAB) ? u->dlm : u->ier;
    case REG_IIR:
        source = pending_source(dev);
        if (source == IIR_THRE) {
            u->thre_pending = 0;        /* reading IIR acknowledges THRE */
            update_irq(dev);
        }
        return (uint8_t)(source | ((u->fcr & 1) ? IIR_FIFO : 0));
    case REG_LCR:
        return u->lcr;
    case REG_MCR:
        return u->mcr;
    case REG_LSR:
        return (uint8_t)(LSR_THRE | LSR_TEMT | (rx_ready(dev->dom) ? LSR_DR : 0));
    case REG_MSR:
        return MSR_IDLE;
    case REG_SCR:
        return u->scr;
    }
    return val;
}

void hv_uart_write(struct hv_devices *dev, int offset, uint8_t val)
{
    struct hv_uart *u = &dev->uart;

    switch (offset) {
    case REG_DATA:
        if (u->lcr & LCR_DLAB) {
            u->dll = val;
            return;
        }
        /* THR taken: the line drops; sent at once, THR is empty again: it rises. */
        u->thre_pending = 0;
        update_irq(dev);
        transmit(dev, val);
        u->thre_pending = 1;
        update_irq(dev);
        return;
    case REG_IER:
        if (u->lcr & LCR_DLAB) {
            u->dlm = val;
            return;
        }
        /* Enabling THRE while THR is empty raises it at once, as the chip does. */
        if ((val & IER_THRE) && !(u->ier & IER_THRE))
            u->thre_pending = 1;
        u->ier = val & 0x0f;
        update_irq(dev);
        return;
    case REG_IIR:
        u->fcr = val & 0xc9;            /* FIFO enable, DMA mode, trigger level */
        return;
    case REG_LCR:
        u->lcr = val;
        return;
    case REG_MCR:
        u->mcr = val & 0x1f;
        update_irq(dev);
        return;
    case REG_SCR:
        u->scr = val;
        return;
    }
    /* LSR and MSR are read-only: writes vanish. */
}
