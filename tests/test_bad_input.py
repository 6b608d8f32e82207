"""Bad input never ends in a traceback: each mistake is one line and a clear exit status,
for `python -m hypervisor run`, config files and `python -m hypervisor.console -c`."""
import os
import subprocess
import sys

import pytest

from guest_kernel.asm import rax
from guest_kernel.elf import build_elf
from guest_kernel.runtime import PVProgram
from hypervisor import engines

from helpers import hv

needs_an_engine = pytest.mark.skipif(not engines.available(), reason="no engine on this host")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A directory with a good tiny kernel and every kind of bad file next to it."""
    d = tmp_path_factory.mktemp("bad")
    p = PVProgram(guest_os="poweroff")
    p.a.mov(rax, 0)                                # main returns 0: poweroff
    p.a.ret()
    kernel = p.elf()
    (d / "k.elf").write_bytes(kernel)
    (d / "a-directory").mkdir()
    os.mkfifo(d / "fifo")
    with open(d / "huge.elf", "wb") as f:          # a good header, then 3 GiB (sparse)
        f.write(kernel)
        f.truncate(3 << 30)
    with open(d / "huge.cfg", "wb") as f:
        f.truncate(3 << 30)
    return d


def one_line(r: subprocess.CompletedProcess) -> str:
    """The single line on stderr (asserting there is exactly one and no traceback)."""
    assert "Traceback" not in r.stderr, r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    return lines[0]


def hv_bytes(*args: bytes | str, timeout: float = 60) -> subprocess.CompletedProcess:
    """Like helpers.hv, but arguments may be bytes, as a shell passes $'\\xff'."""
    argv = [sys.executable.encode(), b"-m", b"hypervisor",
            *(a if isinstance(a, bytes) else str(a).encode() for a in args)]
    return subprocess.run(argv, capture_output=True, text=True, errors="replace",
                          timeout=timeout)


def console(commands: bytes | str, timeout: float = 60) -> subprocess.CompletedProcess:
    if isinstance(commands, str):
        commands = commands.encode()
    return subprocess.run([sys.executable.encode(), b"-m", b"hypervisor.console", b"-c",
                           commands], capture_output=True, text=True, errors="replace",
                          timeout=timeout)


# ---- 1: --timeout and other numeric options --------------------------------------------

@pytest.mark.parametrize("value", ["inf", "nan", "-1", "0", "1e300", "soon"])
def test_timeout_must_be_finite_and_positive(files, value):
    r = hv("run", files / "k.elf", "--timeout", value)
    assert r.returncode == 2
    assert one_line(r) == (f"python -m hypervisor run: error: argument --timeout: '{value}': "
                           f"must be a finite number of seconds above 0 (at most 9223372036)")


@needs_an_engine
def test_a_good_timeout_still_runs_the_guest(files):
    r = hv("run", files / "k.elf", "--timeout", "30")
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("args, message", [
    (["run", "--memory", "-5"], "trapless: memory -5 MiB: must be between 4 and 3838 MiB"),
    (["run", "--memory", "9" * 40], f"trapless: memory {'9' * 40} MiB: must be between 4 and "
                                    f"3838 MiB"),
    (["bench", "--iterations", "0"], "python -m hypervisor bench: error: argument --iterations: "
                                     "'0': must be a whole number above 0"),
    (["bench", "--samples", "-3"], "python -m hypervisor bench: error: argument --samples: "
                                   "'-3': must be a whole number above 0"),
    (["conformance", "--fuzz-calls", "-1"], "python -m hypervisor conformance: error: argument "
                                            "--fuzz-calls: '-1': must be a whole number above 0"),
    (["conformance", "--seed", "zz"], "python -m hypervisor conformance: error: argument --seed: "
                                      "'zz': must be a number (decimal or 0x...)"),
])
def test_absurd_numbers_are_one_line(files, args, message):
    if args[0] == "run":
        args = ["run", files / "k.elf", *args[1:]]
    r = hv(*args)
    assert r.returncode == 2
    assert one_line(r) == message


@pytest.mark.parametrize("args, message", [
    (["compare", "--json", "/nonexistent/c.json"], "python -m hypervisor compare: error: argument "
                                                   "--json: '/nonexistent/c.json': no such "
                                                   "directory /nonexistent"),
    (["conformance", "--json", "/"], "python -m hypervisor conformance: error: argument --json: "
                                     "'/': is a directory"),
])
def test_a_report_path_is_checked_before_the_work(args, message):
    r = hv(*args, timeout=20)
    assert r.returncode == 2
    assert one_line(r) == message


# ---- 2, 3: files that are not kernels or configs ---------------------------------------

@pytest.mark.parametrize("name, why", [
    ("a-directory", "is a directory"),
    ("fifo", "is not a regular file (a FIFO)"),
    ("/dev/zero", "is not a regular file (a character device)"),
    ("missing.elf", "no such file"),
    ("huge.elf", "3,221,225,472 bytes; kernel images above 256 MiB are refused"),
    ("huge.cfg", "not an ELF file (bad magic)"),
])
def test_run_refuses_what_is_not_a_kernel_at_once(files, name, why):
    path = name if name.startswith("/") else files / name
    r = hv("run", path, timeout=20)                # a FIFO must not block
    assert r.returncode == 2
    assert one_line(r) == f"trapless: {path}: {why}"


@pytest.mark.parametrize("create, message", [
    ("create a-directory", "a-directory: is a directory"),
    ("create fifo", "fifo: is not a regular file (a FIFO)"),
    ("create /dev/zero", "/dev/zero: is not a regular file (a character device)"),
    ("create huge.cfg", "huge.cfg: 3,221,225,472 bytes: not an ELF image, and config files "
                        "above 64 KiB are refused"),
    ("create kernel=fifo", "command line: kernel = 'fifo': is not a regular file (a FIFO)"),
    ("create kernel=/dev/zero", "command line: kernel = '/dev/zero': is not a regular file "
                                "(a character device)"),
    ("create kernel=a-directory", "command line: kernel = 'a-directory': is a directory"),
])
def test_console_refuses_what_is_not_a_kernel_or_config(files, create, message):
    r = subprocess.run([sys.executable, "-m", "hypervisor.console", "-c", create],
                       capture_output=True, text=True, timeout=20, cwd=files)
    assert r.returncode == 1
    assert one_line(r) == f"error: {message}"


@pytest.mark.parametrize("kernel, why", [
    ("fifo", "is not a regular file (a FIFO)"),
    ("/dev/zero", "is not a regular file (a character device)"),
    ("a-directory", "is a directory"),
])
def test_a_config_naming_a_bad_kernel(files, tmp_path, kernel, why):
    from hypervisor import config
    from hypervisor.errors import ConfigError

    cfg = tmp_path / "d.cfg"
    cfg.write_text(f'kernel = "{files / kernel if not kernel.startswith("/") else kernel}"\n')
    with pytest.raises(ConfigError) as e:
        config.load(cfg)
    shown = files / kernel if not kernel.startswith("/") else kernel
    assert str(e.value) == f"{cfg}: kernel = '{shown}': {why}"


# ---- 4: a start-of-day region that cannot be mapped ------------------------------------

def region_image(virt_base: int) -> bytes:
    from guest_kernel.asm import Section
    from abi import C

    start = virt_base + 0x100000
    text = Section(".text", start, b"\x48\x31\xc0\xc3", 4, "rx")
    page = Section(".data", start + 0x1000, b"", 0x1000, "rw")
    return build_elf([text, page], {}, start,
                     [(C.XEN_ELFNOTE_ENTRY, start), (C.XEN_ELFNOTE_VIRT_BASE, virt_base),
                      (C.XEN_ELFNOTE_HYPERCALL_PAGE, start + 0x1000)], virt_base=virt_base)


# (a Xen-model image: its start-of-day region is mapped from VIRT_BASE itself, as Xen's
# builder maps it)
@pytest.mark.parametrize("virt_base, problem", [
    ((1 << 64) - 0x200000, "[0xffffffffffe00000-0x10000000000200000) wraps past 2^64"),
    ((1 << 47) - 0x200000, "[0x7fffffe00000-0x800000200000) is not canonical (x86-64 maps "
                           "[0-0x800000000000) and [0xffff800000000000-2^64) only)"),
])
def test_run_refuses_a_region_past_2_64_or_in_the_hole(tmp_path, virt_base, problem):
    image = tmp_path / "high.elf"
    image.write_bytes(region_image(virt_base))
    r = hv("run", image)
    assert r.returncode == 2
    assert one_line(r) == (f"trapless: the start-of-day region at VIRT_BASE {virt_base:#x} "
                           f"cannot be mapped: {problem}")


# ---- 5: command lines ------------------------------------------------------------------

def test_run_refuses_a_command_line_that_is_not_utf8(files):
    r = hv_bytes("run", files / "k.elf", "--cmdline", b"ok \xff")
    assert r.returncode == 2
    assert one_line(r) == ("python -m hypervisor run: error: argument --cmdline: command line "
                           "is not valid UTF-8 (byte 0xff at offset 3)")


def test_run_refuses_a_command_line_above_xens_limit(files):
    r = hv("run", files / "k.elf", "--cmdline", "a" * 1024)
    assert r.returncode == 2
    assert one_line(r) == ("python -m hypervisor run: error: argument --cmdline: command line "
                           "is 1024 bytes; the limit is 1023 (Xen's MAX_GUEST_CMDLINE with "
                           "its NUL)")


@needs_an_engine
def test_console_create_with_a_bad_cmdline_fails_and_the_script_goes_on(files):
    r = console(b"create " + str(files / "k.elf").encode() + b" cmdline=\xff; "
                b"create " + str(files / "k.elf").encode() + b" cmdline=" + b"a" * 1100 + b"; "
                b"create " + str(files / "k.elf").encode() + b" name=fine on_poweroff=preserve; "
                b"list")
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert r.stderr.splitlines() == [
        f"error: {files}/k.elf: cmdline: command line is not valid UTF-8 (byte 0xff at offset 0)",
        f"error: {files}/k.elf: cmdline: command line is 1100 bytes; the limit is 1023 (Xen's "
        f"MAX_GUEST_CMDLINE with its NUL)"]
    assert "created domain 1 (fine)" in r.stdout        # the script went on


def test_a_config_file_cmdline_that_is_too_long(files, tmp_path):
    from hypervisor import config
    from hypervisor.errors import ConfigError

    cfg = tmp_path / "d.cfg"
    cfg.write_text(f'kernel = "{files}/k.elf"\ncmdline = "{"a" * 600}"\nextra = "{"b" * 600}"\n')
    with pytest.raises(ConfigError, match=r"d\.cfg: cmdline \+ extra: command line is 1201 "
                                          r"bytes; the limit is 1023"):
        config.load(cfg)


def test_the_domain_api_refuses_a_bad_cmdline_too(files):
    from hypervisor.domain import Domain
    from hypervisor.errors import ImageError

    if not engines.available():
        pytest.skip("no engine on this host")
    with pytest.raises(ImageError, match=r"^command line is not valid UTF-8 \(byte 0xff at "
                                         r"offset 1\)$"):
        Domain(files / "k.elf", memory_mib=8, cmdline="a\udcff")


# ---- 6: config values of the wrong type ------------------------------------------------

@pytest.mark.parametrize("line, message", [
    ('memory = "32"', "memory = '32': expected a whole number, not a string"),
    ('maxmem = "64"', "maxmem = '64': expected a whole number, not a string"),
    ("name = 7", 'name = 7: strings must be quoted ("7")'),
    ("cmdline = 3", 'cmdline = 3: strings must be quoted ("3")'),
    ("memory = " + "9" * 5000, "memory = 99999999999999999999...: number too long"),
])
def test_console_create_refuses_values_of_the_wrong_type(files, line, message):
    (files / "typed.cfg").write_text(f'kernel = "k.elf"\n{line}\n')
    r = subprocess.run([sys.executable, "-m", "hypervisor.console", "-c", "create typed.cfg"],
                       capture_output=True, text=True, timeout=20, cwd=files)
    assert r.returncode == 1
    assert one_line(r) == f"error: typed.cfg:2: {message}"


def test_an_empty_kernel_path(files):
    (files / "empty.cfg").write_text('kernel = ""\n')
    r = subprocess.run([sys.executable, "-m", "hypervisor.console", "-c", "create empty.cfg"],
                       capture_output=True, text=True, timeout=20, cwd=files)
    assert one_line(r) == "error: empty.cfg:1: kernel = '': must name a file"


@needs_an_engine
def test_piped_commands_that_are_not_utf8_fail_one_by_one(files):
    """In a UTF-8 locale stdin is strict; a byte that is not UTF-8 must not end the shell."""
    os.link(files / "k.elf", os.path.join(os.fsencode(files), b"\xff.elf"))
    r = subprocess.run([sys.executable, "-m", "hypervisor.console"],
                       input=b"create \xff.cfg\ncreate k.elf cmdline=\xfe\nhelp quit\n"
                             b"create \xff.elf name=odd on_poweroff=preserve\ndmesg\n",
                       capture_output=True, timeout=30, cwd=files,
                       env={**os.environ, "PYTHONIOENCODING": "utf-8:strict"})
    err = r.stderr.decode(errors="replace")
    assert "Traceback" not in err
    assert err.splitlines() == [
        "error: \\udcff.cfg: no such file",
        "error: k.elf: cmdline: command line is not valid UTF-8 (byte 0xfe at offset 0)"]
    assert b"destroy every domain and leave" in r.stdout        # `help quit` still ran
    assert b"created: \\udcff.elf" in r.stdout                  # dmesg shows it escaped
    assert r.returncode == 1


def test_a_config_file_that_is_not_text(files):
    (files / "binary.cfg").write_bytes(b'kernel = "k.elf"\n\xff\n')
    r = subprocess.run([sys.executable, "-m", "hypervisor.console", "-c", "create binary.cfg"],
                       capture_output=True, text=True, timeout=20, cwd=files)
    assert one_line(r) == ("error: binary.cfg: neither an ELF image nor a text config file "
                           "(byte 0xff at offset 17 is not UTF-8)")


# ---- 8 (deterministic part): what `run` does not import --------------------------------

def test_the_cli_imports_neither_rich_nor_pycparser_nor_the_compare_guests():
    heavy = ("rich", "pycparser", "cffi", "construct", "guest_kernel.compare_workloads",
             "guest_kernel.pv_kernel")
    code = ("import sys, hypervisor.cli, hypervisor.domain; hypervisor.cli.build_parser(); "
            f"print(sorted(m for m in {heavy!r} if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "[]"
