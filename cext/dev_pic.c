/*
 * dev_pic.c - the PC's two 8259A interrupt controllers: master at 0x20 (IRQ 0-7), slave
 * at 0xA0 (IRQ 8-15), cascaded on the master's input 2.
 *
 * Inputs are edge-triggered: a rising edge sets the request bit (IRR). The highest-
 * priority request that is not masked (IMR) and not outranked by one in service (ISR)
 * goes to the CPU; taking it (INTA) moves it from IRR to ISR, where it blocks equal and
 * lower priorities until an EOI. Modelled: the ICW1-ICW4 initialisation sequence (vector
 * base, single/cascade, auto-EOI), OCW1 masking, OCW2 EOIs (non-specific, specific, and
 * the rotating forms and set-priority), OCW3 (read IRR or ISR, poll, special mask).
 * Before the guest initialises them they are as a PC BIOS leaves them: vectors 0x08 and
 * 0x70, every input masked.
 */
#include "hv.h"

#define ICW1_INIT   0x10
#define ICW1_IC4    0x01
#define ICW1_SNGL   0x02
#define ICW4_AEOI   0x02
#define OCW3_SELECT 0x08            /* bits 4:3 = 01: OCW3 (00: OCW2) */
#define CASCADE_IRQ 2

static void reset_chip(struct hv_pic_chip *c, uint8_t vector_base)
{
    *c = (struct hv_pic_chip){ .vector_base = vector_base, .imr = 0xff, .lowest = 7 };
}

void hv_pic_reset(struct hv_pic *p)
{
    reset_chip(&p->chip[0], 0x08);
    reset_chip(&p->chip[1], 0x70);
}

/* Priority rank of input irq: 0 is the highest. */
static int rank(const struct hv_pic_chip *c, int irq)
{
    return (irq - c->lowest - 1) & 7;
}

/* The highest-priority input among bits, or -1. */
static int highest(const struct hv_pic_chip *c, uint8_t bits)
{
    for (int r = 0; r < 8; r++) {
        int irq = (c->lowest + 1 + r) & 7;
        if (bits & (1u << irq))
            return irq;
    }
    return -1;
}

/* The input this chip would signal to the CPU (or to the master), or -1. */
static int chip_pending(const struct hv_pic_chip *c)
{
    int irq = highest(c, c->irr & ~c->imr), in_service;
    uint8_t isr = c->isr;

    if (irq < 0)
        return -1;
    if (c->special_mask)
        isr &= ~c->imr;             /* masked inputs in service block nothing */
    in_service = highest(c, isr);
    if (in_service >= 0 && rank(c, in_service) <= rank(c, irq))
        return -1;
    return irq;
}

static void chip_set_line(struct hv_pic_chip *c, int irq, int level)
{
    uint8_t bit = (uint8_t)(1u << irq);
    if (level && !(c->lines & bit))
        c->irr |= bit;
    if (level)
        c->lines |= bit;
    else
        c->lines &= (uint8_t)~bit;
}

/* The slave's output is the master's input 2. */
static void cascade(struct hv_pic *p)
{
    if (!p->chip[0].single)
        chip_set_line(&p->chip[0], CASCADE_IRQ, chip_pending(&p->chip[1]) >= 0);
}

void hv_pic_set_irq(struct hv_devices *dev, int irq, int level)
{
    struct hv_pic *p = &dev->pic;
    if (irq < 0 || irq > 15)
        return;
    if (irq < 8) {
        chip_set_line(&p->chip[0], irq, level);
    } else {
        chip_set_line(&p->chip[1], irq - 8, level);
        cascade(p);
    }
}

int hv_pic_vector(struct hv_pic *p)
{
    int irq = chip_pending(&p->chip[0]), slave_irq;
    if (irq < 0)
        return -1;
    if (irq == CASCADE_IRQ && !p->chip[0].single) {
        slave_irq = chip_pending(&p->chip[1]);
        /* The slave's request went away after it raised the line: its spurious IR7. */
        return p->chip[1].vector_base + (slave_irq < 0 ? 7 : slave_irq);
    }
    return p->chip[0].vector_base + irq;
}

/* INTA on one chip: the request moves to in-service (unless auto-EOI). */
static void chip_ack(struct hv_pic_chip *c, int irq)
{
    uint8_t bit = (uint8_t)(1u << irq);
    c->irr &= (uint8_t)~bit;
    if (c->auto_eoi)
        return;
    c->isr |= bit;
}

void hv_pic_acknowledge(struct hv_devices *dev, int vector)
{
    struct hv_pic *p = &dev->pic;
    struct hv_pic_chip *m = &p->chip[0], *s = &p->chip[1];

    dev->stats.irqs_delivered++;
    if (vector >= m->vector_base && vector < m->vector_base + 8 &&
        (m->single || vector - m->vector_base != CASCADE_IRQ)) {
        chip_ack(m, vector - m->vector_base);
        return;
    }
    if (!m->single && vector >= s->vector_base && vector < s->vector_base + 8) {
        int irq = vector - s->vector_base;
        if (s->irr & (1u << irq))
            chip_ack(s, irq);
        chip_ack(m, CASCADE_IRQ);
        cascade(p);
    }
}

/* OCW2: end of interrupt, and the priority rotations. */
static void ocw2(struct hv_devices *dev, struct hv_pic_chip *c, uint8_t val)
{
    int level = val & 7, irq;

    switch (val >> 5) {
    case 1:                         /* non-specific EOI */
    case 5:                         /* ... and rotate */
        irq = highest(c, c->isr);
        if (irq < 0)
            return;
        c->isr &= (uint8_t)~(1u << irq);
        dev->stats.eois++;
        if (val >> 5 == 5)
            c->lowest = (uint8_t)irq;
        return;
    case 3:                         /* specific EOI */
    case 7:                         /* ... and rotate */
        c->isr &= (uint8_t)~(1u << level);
        dev->stats.eois++;
        if (val >> 5 == 7)
            c->lowest = (uint8_t)level;
        return;
    case 6:                         /* set priority: `level` becomes the lowest */
        c->lowest = (uint8_t)level;
        return;
    }
    /* 0 and 4 (rotate in auto-EOI mode, clear/set) and 2 (no operation): nothing to do
     * for a rotation nobody enables here. */
}

static uint8_t poll(struct hv_devices *dev, int which)
{
    struct hv_pic *p = &dev->pic;
    struct hv_pic_chip *c = &p->chip[which];
    int irq = chip_pending(c);
    if (irq < 0)
        return 0;
    chip_ack(c, irq);
    if (which == 1)
        cascade(p);
    return (uint8_t)(0x80 | irq);
}

uint8_t hv_pic_read(struct hv_devices *dev, int which, int offset)
{
    struct hv_pic_chip *c = &dev->pic.chip[which];
    if (offset == 1)
        return c->imr;
    if (c->poll) {
        c->poll = 0;
        return poll(dev, which);
    }
    return c->read_isr ? c->isr : c->irr;
}

void hv_pic_write(struct hv_devices *dev, int which, int offset, uint8_t val)
{
    struct hv_pic *p = &dev->pic;
    struct hv_pic_chip *c = &p->chip[which];

    if (offset == 0) {
        if (val & ICW1_INIT) {
            /* ICW1: start over; the mask is cleared and the ICWs follow on the data port. */
            uint8_t lines = c->lines;
            reset_chip(c, c->vector_base);
            c->imr = 0;
            c->lines = lines;
            c->need_icw4 = val & ICW1_IC4;
            c->single = (val & ICW1_SNGL) ? 1 : 0;
            c->init_step = 2;
        } else if (val & OCW3_SELECT) {
            if (val & 0x04)
                c->poll = 1;
            if (val & 0x02)
                c->read_isr = val & 1;
            if (val & 0x40)
                c->special_mask = (val >> 5) & 1;
        } else {
            ocw2(dev, c, val);
        }
    } else {
        switch (c->init_step) {
        case 2:                     /* ICW2: the vector of input 0 */
            c->vector_base = val & 0xf8;
            c->init_step = c->single ? (c->need_icw4 ? 4 : 0) : 3;
            break;
        case 3:                     /* ICW3: the cascade wiring */
            c->icw3 = val;
            c->init_step = c->need_icw4 ? 4 : 0;
            break;
        case 4:                     /* ICW4 */
            c->auto_eoi = (val & ICW4_AEOI) ? 1 : 0;
            c->init_step = 0;
            break;
        default:                    /* OCW1: the mask */
            c->imr = val;
        }
    }
    if (which == 1)
        cascade(p);
}
