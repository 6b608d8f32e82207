"""python -m guest_kernel {pv,native} -o FILE: write a guest kernel's ELF image."""
import argparse
from pathlib import Path

from .native_kernel import build_native_kernel
from .pv_kernel import build_pv_kernel

KERNELS = {"pv": build_pv_kernel, "native": build_native_kernel}

parser = argparse.ArgumentParser(prog="python -m guest_kernel", description=__doc__)
parser.add_argument("kernel", choices=sorted(KERNELS))
parser.add_argument("-o", "--output", required=True, type=Path)
args = parser.parse_args()
args.output.write_bytes(KERNELS[args.kernel]())
print(f"wrote {args.output}")
