# trapless: make setup · make run-guest · make test · make stress · make bench · make conformance · make compare
#           make xtf · make xtf-run · make linux-guest · make run-linux · make run-linux-pv · make run-linux-disk
#           make bench-linux · make bench-blk · make bench-net
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
KERNEL := build/pv-kernel.elf
CMDLINE ?= console=hvc0 ticks=20 hello from make run-guest

.PHONY: setup run-guest test stress bench conformance compare kernel clean linux-guest run-linux run-linux-pv run-linux-disk compare-linux bench-blk bench-linux bench-net

# A virtualenv with trapless installed in editable mode; the C extension is rebuilt
# whenever a C source or the ABI header changes. Then the patched Unicorn the bt engine
# runs on (third_party/unicorn: kicks from other threads without a per-block hook),
# built once from Unicorn's source distribution; without it bt runs on the unicorn
# package's library.
UNICORN_LIB := build/unicorn/libunicorn.so.2
setup: $(VENV)/.installed $(UNICORN_LIB)
$(VENV)/.installed: pyproject.toml setup.py cext/*.c cext/*.h cext/build_cext.py abi/xen_abi.h
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $@
# A build that fails says so in one line and is not fatal: bt then runs on the package's
# library (with the per-block hook), and the next make tries again.
$(UNICORN_LIB): third_party/unicorn/*.patch scripts/unicorn-build.sh | $(VENV)/.installed
	scripts/unicorn-build.sh $(BIN) || true

kernel: $(KERNEL)
$(KERNEL): $(VENV)/.installed guest_kernel/*.py abi/xen_abi.h
	@mkdir -p build
	$(BIN)/python -m guest_kernel pv -o $@

run-guest: $(KERNEL)
	$(BIN)/python -m hypervisor run $(KERNEL) --cmdline "$(CMDLINE)"

test: setup
	$(BIN)/python -m pytest -q

# the long runs: a thousand domains per engine, a hundred ticking for tens of seconds,
# the timer-lateness guest hundreds of times, two Linux PV domUs pinging each other
# (a few minutes)
stress: setup
	$(BIN)/python -m pytest -q -m stress tests/test_stress.py tests/test_linux_guest.py

bench: setup
	$(BIN)/python -m hypervisor bench

# sequential read and write through Xen's block device vs the host, on each engine
bench-blk: setup
	$(BIN)/python -m hypervisor.bench_blk kvm bt

# ping round trip between two domains through netfront, netback and a bridge, in bare exits
bench-net: setup
	$(BIN)/python -m hypervisor.bench_net kvm bt

# every conformance case on every available engine, the fuzz case at 100,000 calls
conformance: setup
	@mkdir -p build
	$(BIN)/python -m hypervisor conformance --json build/conformance.json

# every workload as a PV and a native guest on every available engine: the table, and
# one JSON record per run in build/compare.json
compare: setup
	@mkdir -p build
	$(BIN)/python -m hypervisor compare --json build/compare.json

# XTF, the Xen Test Framework: the pinned source (a tarball; in CI it sits beside the
# repository in shared/) or your own checkout with XTF=/path/to/xtf, built with the
# system gcc into build/xtf for the environments trapless runs or soon will.
XTF_TARBALL ?= ../shared/xtf/xtf-src.tar.gz
XTF_ENVS    ?= pv64 hvm64
.PHONY: xtf xtf-run
xtf:
	scripts/xtf-build.sh "$(or $(XTF),$(XTF_TARBALL))" build/xtf $(XTF_ENVS)

# every built XTF image on every available engine: the test x engine table, and one JSON
# record per run in build/xtf.json
xtf-run: setup xtf
	$(BIN)/python -m hypervisor xtf --json build/xtf.json

clean:
	rm -rf build $(VENV) *.egg-info hypervisor/_hv*.so

# Debian's own kernel as a PVH guest: `make linux-guest` fetches linux-image-cloud-amd64
# and busybox-static with apt-get download (no install), takes vmlinux out of the bzImage
# and builds a busybox initramfs into build/linux; `make run-linux` boots it on bt (its
# code calls Xen with vmcall, which this host's KVM cannot hand over). Add `shell` to
# LINUX_CMDLINE for the initramfs's interactive busybox shell instead of a poweroff.
LINUX_CMDLINE ?= console=hvc0
linux-guest: setup
	$(BIN)/python -m hypervisor.linux_guest --out build/linux

run-linux: linux-guest
	$(BIN)/python -m hypervisor run build/linux/vmlinux --type pvh --engine bt --memory 256 \
	    --ramdisk build/linux/initramfs.cpio --cmdline "$(LINUX_CMDLINE)"

# The same kernel as a Xen PV domU: its kernel in ring 3 under Xen's PV CPU model, the
# initramfs at start_info.mod_start. LINUX_PV_ENGINE=kvm runs it on kvm (slower on this
# host: every hypercall and emulated instruction is an exit, and Linux's PIT calibration
# alone reads a port about 100,000 times; see docs/measurements.md).
LINUX_PV_ENGINE ?= bt
run-linux-pv: linux-guest
	$(BIN)/python -m hypervisor run build/linux/vmlinux --type pv --engine $(LINUX_PV_ENGINE) \
	    --memory 256 --ramdisk build/linux/initramfs.cpio --cmdline "$(LINUX_CMDLINE)"

# The same Linux with a disk: an ext4 image made here (mkfs.ext4 -d, no root mount)
# holding hello.txt and 512 KiB of random.bin, given as xl's disk spec; /init
# (`disktest` on the command line) mounts /dev/xvda, prints hello.txt, writes guest.txt,
# prints random.bin's MD5 and copies it to copy.bin, unmounts and powers off; the host
# then prints guest.txt out of the image (debugfs) and the MD5s of both files.
# LINUX_TYPE=pv runs it as a PV domU, and LINUX_ENGINE=kvm runs that PV domU on kvm
# (a PVH Linux cannot run on this host's kvm: it calls Xen with vmcall/vmmcall, which
# needs KVM_CAP_XEN_HVM; `run` says so in one line).
LINUX_DISK := build/linux/disk.img
LINUX_TYPE ?= pvh
LINUX_ENGINE ?= bt
run-linux-disk: linux-guest
	rm -rf build/linux/disk-files && mkdir -p build/linux/disk-files
	echo "hello from the host, $$(date -u)" > build/linux/disk-files/hello.txt
	head -c 524288 /dev/urandom > build/linux/disk-files/random.bin
	mkfs.ext4 -q -F -d build/linux/disk-files $(LINUX_DISK) 16M
	$(BIN)/python -m hypervisor run build/linux/vmlinux --type $(LINUX_TYPE) --engine $(LINUX_ENGINE) \
	    --memory 256 --ramdisk build/linux/initramfs.cpio --cmdline "console=hvc0 disktest" \
	    --disk "format=raw, vdev=xvda, access=rw, target=$(LINUX_DISK)"
	@echo "--- guest.txt, read back from $(LINUX_DISK) by the host:"
	@debugfs -R 'cat /guest.txt' $(LINUX_DISK) 2>/dev/null
	@echo "--- MD5 of random.bin as the host wrote it, and of the guest's copy.bin:"
	@md5sum < build/linux/disk-files/random.bin
	@debugfs -R 'cat /copy.bin' $(LINUX_DISK) 2>/dev/null | md5sum

# the same kernel and initramfs under trapless (bt) and QEMU's TCG (`pc`, PVH entry; see
# docs/measurements.md):
# wall time to the kernel banner, to `Run /init`, to /init's line, to the end
# The package's bytecode is compiled first, as an installed package has it: with
# PYTHONDONTWRITEBYTECODE set, each run would otherwise compile it again in its time.
compare-linux: linux-guest
	$(BIN)/python -m compileall -q hypervisor abi guest_kernel
	$(BIN)/python -m hypervisor.compare_linux --dir build/linux

bench-linux: compare-linux

