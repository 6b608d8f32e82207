#include "hv.h"
int64_t do_multicall(struct hv_vcpu *v, const struct hv_hcall *h) { return -XEN_ENOSYS; }
