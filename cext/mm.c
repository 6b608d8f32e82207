#include "hv.h"
int64_t do_mmu_update(struct hv_vcpu *v, const struct hv_hcall *h) { return -XEN_ENOSYS; }
int64_t do_mmuext_op(struct hv_vcpu *v, const struct hv_hcall *h) { return -XEN_ENOSYS; }
