/*
 * console.c - console_io: the domain's emergency console.
 *
 * CONSOLEIO_write keeps what Xen keeps for an unprivileged domain (printable
 * characters, newline and tab) and writes it to the domain's console fd.
 * CONSOLEIO_read takes bytes the toolstack queued with hv_domain_console_input(),
 * which raises VIRQ_CONSOLE (if the guest bound it) so a guest can block for input.
 * The same input also goes to the PV console ring, if the domain has one
 * (console_ring.c): a guest reads whichever it uses, and the one it ignores fills up.
 */
#include <errno.h>
#include <pthread.h>
#include <string.h>
#include <unistd.h>

#include "hv.h"

#define CHUNK 512

void hv_console_emit(struct hv_domain *d, const uint8_t *buf, size_t len)
{
    while (len && d->console_fd >= 0) {
        ssize_t n = write(d->console_fd, buf, len);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return;             /* the reader went away: output is dropped, the guest goes on */
        buf += n;
        len -= (size_t)n;
    }
}

static int64_t console_write(struct hv_vcpu *v, uint64_t count, uint64_t buffer)
{
    uint8_t raw[CHUNK], out[CHUNK];
    uint64_t done = 0;

    while (done < count) {
        uint64_t n = count - done < CHUNK ? count - done : CHUNK;
        size_t kept = 0;
        if (hv_copy_from_guest(v, raw, buffer + done, n) < 0)
            return -XEN_EFAULT;
        for (uint64_t i = 0; i < n; i++)
            if ((raw[i] >= 0x20 && raw[i] < 0x7f) || raw[i] == '\n' || raw[i] == '\t')
                out[kept++] = raw[i];
        hv_console_emit(v->dom, out, kept);
        done += n;
    }
    return 0;
}

static int64_t console_read(struct hv_vcpu *v, uint64_t count, uint64_t buffer)
{
    struct hv_domain *d = v->dom;
    uint8_t tmp[HV_CONSOLE_IN];
    uint32_t n = 0;

    pthread_mutex_lock(&d->console_lock);
    while (n < count && n < sizeof(tmp) && d->console_in_cons != d->console_in_prod)
        tmp[n++] = d->console_in[d->console_in_cons++ & (HV_CONSOLE_IN - 1)];
    if (n && hv_copy_to_guest(v, buffer, tmp, n) < 0) {
        d->console_in_cons -= n;    /* undo: a bad buffer loses no input */
        pthread_mutex_unlock(&d->console_lock);
        return -XEN_EFAULT;
    }
    pthread_mutex_unlock(&d->console_lock);
    return n;
}

int64_t do_console_io(struct hv_vcpu *v, const struct hv_hcall *h)
{
    switch ((uint32_t)h->a1) {     /* Xen's cmd and count are unsigned int */
    case CONSOLEIO_write:
        return console_write(v, h->a2 & 0xffffffffULL, h->a3);
    case CONSOLEIO_read:
        return console_read(v, h->a2 & 0xffffffffULL, h->a3);
    default:
        return -XEN_ENOSYS;
    }
}

/* The console stream ends: its reader sees end of file once it has read the rest. */
void hv_console_close(struct hv_domain *d)
{
    int fd = __atomic_exchange_n(&d->console_fd, -1, __ATOMIC_ACQ_REL);
    if (fd >= 0)
        close(fd);
}

int hv_domain_console_input(struct hv_domain *d, const uint8_t *buf, int len)
{
    int n = 0, ring;
    pthread_mutex_lock(&d->console_lock);
    while (n < len && d->console_in_prod - d->console_in_cons < HV_CONSOLE_IN)
        d->console_in[d->console_in_prod++ & (HV_CONSOLE_IN - 1)] = buf[n++];
    pthread_mutex_unlock(&d->console_lock);
    if (n > 0) {
        hv_send_virq(d, 0, VIRQ_CONSOLE);   /* -ENOENT when unbound: the guest polls instead */
        hv_devices_console_input(d);        /* a native guest's UART: data-ready interrupt */
    }
    ring = hv_console_ring_input(d, buf, len);
    return ring > n ? ring : n;             /* what at least one way in took */
}
