"""hvm_op (34): HVMOP_set_param / get_param, the upcall vector (HVM_PARAM_CALLBACK_IRQ)."""
import struct

from abi import C

from guest_kernel.conformance import NON_CANONICAL, NULL, ConformanceGuest

EFAULT, EINVAL, EPERM, ESRCH, ENOSYS = (-C.XEN_EFAULT, -C.XEN_EINVAL, -C.XEN_EPERM,
                                        -C.XEN_ESRCH, -C.XEN_ENOSYS)
VECTOR = C.HVM_PARAM_CALLBACK_TYPE_VECTOR << C.HVM_PARAM_CALLBACK_TYPE_SHIFT


def test_hvm_params(run_cases):
    g = ConformanceGuest("hvm_op")
    s, cb = C.DOMID_SELF, C.HVM_PARAM_CALLBACK_IRQ
    g.call("set_vector", "hvm_op", C.HVMOP_set_param,
           g.struct("p1", "xen_hvm_param", domid=s, index=cb, value=VECTOR | 0xF3))
    g.call("get_vector", "hvm_op", C.HVMOP_get_param, g.struct("p2", "xen_hvm_param", domid=s, index=cb))
    g.dump("get_vector", "p2", 16)
    g.call("set_gsi", "hvm_op", C.HVMOP_set_param,
           g.struct("p3", "xen_hvm_param", domid=s, index=cb, value=5))
    g.call("set_exception_vector", "hvm_op", C.HVMOP_set_param,
           g.struct("p4", "xen_hvm_param", domid=s, index=cb, value=VECTOR | 0x0E))
    g.call("set_other_param", "hvm_op", C.HVMOP_set_param,
           g.struct("p5", "xen_hvm_param", domid=s, index=C.HVM_PARAM_STORE_PFN, value=1))
    g.call("get_out_of_range", "hvm_op", C.HVMOP_get_param,
           g.struct("p6", "xen_hvm_param", domid=s, index=C.HVM_NR_PARAMS))
    g.call("get_other_domain", "hvm_op", C.HVMOP_get_param,
           g.struct("p7", "xen_hvm_param", domid=7, index=cb))
    g.call("get_null", "hvm_op", C.HVMOP_get_param, NULL)
    g.call("set_noncanonical", "hvm_op", C.HVMOP_set_param, NON_CANONICAL)
    g.call("disable", "hvm_op", C.HVMOP_set_param, g.struct("p8", "xen_hvm_param", domid=s, index=cb))
    g.call("unknown_cmd", "hvm_op", 77, "p8")
    run = run_cases(g.finish())
    assert run["set_vector"] == 0 and run["get_vector"] == 0
    assert struct.unpack("<HHIQ", run.dumps["get_vector"])[3] == VECTOR | 0xF3
    assert run["set_gsi"] == EINVAL and run["set_exception_vector"] == EINVAL
    assert run["set_other_param"] == EPERM
    assert run["get_out_of_range"] == EINVAL
    assert run["get_other_domain"] == ESRCH
    assert run["get_null"] == EFAULT and run["set_noncanonical"] == EFAULT
    assert run["disable"] == 0
    assert run["unknown_cmd"] == ENOSYS
