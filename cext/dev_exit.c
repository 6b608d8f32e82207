/*
 * dev_exit.c - the exit port (0x501, where QEMU's isa-debug-exit sits): how a native
 * guest powers off. The value written, at any width, is the Xen shutdown reason
 * (0 poweroff, 1 reboot, 2 suspend, 3 crash, 4 watchdog, 5 soft_reset); any other
 * value is a crash. Reads float high.
 */
#include "hv.h"

void hv_exit_port_write(struct hv_devices *dev, uint32_t val)
{
    pthread_mutex_lock(&dev->lock);
    dev->stats.exit_value = val;
    pthread_mutex_unlock(&dev->lock);
    hv_domain_shutdown(dev->dom, val <= SHUTDOWN_soft_reset ? (int)val : SHUTDOWN_crash);
}
