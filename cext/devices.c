/*
 * devices.c - the device models a native (unmodified) guest drives with privileged
 * instructions. A domain built without devices has none: every port is unclaimed
 * (reads float high, writes vanish) and every unmapped access is a fault.
 */
#include "hv.h"

int hv_devices_port_io(struct hv_vcpu *v, uint16_t port, int size, int is_write, uint8_t *data)
{
    return 0;
}

int hv_devices_mmio(struct hv_vcpu *v, uint64_t gpa, int size, int is_write, uint8_t *data)
{
    return 0;
}

int hv_devices_irq_vector(struct hv_domain *d)
{
    return -1;
}

void hv_devices_irq_injected(struct hv_domain *d, int vector)
{
}

void hv_devices_destroy(struct hv_domain *d)
{
}
