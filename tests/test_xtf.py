"""`python -m hypervisor xtf`: the runner reads XTF's verdict lines (or trapless's stop
reason) from real guests, one record per (test, env, engine).

The guests here are small PV programs that print what an XTF test prints (common/
report.c: "Test result: <STATUS>", the reason on the line before it, "PANIC: ..." from
panic()); the last test runs real XTF images when `make xtf` has built them."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from abi import C
from guest_kernel.asm import eax
from guest_kernel.runtime import PVProgram
from hypervisor import cli, engines, xtf

BANNER = "--- Xen Test Framework ---\nEnvironment: PV 64bit (Long mode 4 levels)\n"


def printing_guest(text: str, reason: int = C.SHUTDOWN_poweroff) -> bytes:
    """Prints text through console_io, then shuts down with reason."""
    p = PVProgram(guest_os="XTF-alike", console_ring=False)
    p.print(text)
    p.a.mov(eax, reason)
    p.a.ret()
    return p.elf()


def crashing_guest() -> tuple[bytes, int]:
    """Prints nothing and executes ud2 with no handler: the guest faults. Returns the
    image and the ud2's address."""
    def program() -> PVProgram:
        p = PVProgram(guest_os="XTF-alike", xen_pv=False)   # no IDT in ring 0: a triple fault
        p.a.label("boom")
        p.a.ud2()
        return p
    return program().elf(), program().image().symbols["boom"]


def spinning_guest() -> bytes:
    p = PVProgram(guest_os="XTF-alike")
    p.a.label("spin")
    p.a.jmp("spin")
    return p.elf()


def install(root: Path, name: str, env: str, image: bytes) -> None:
    """Where XTF's build puts an image: tests/<name>/test-<env>-<name>."""
    d = root / "tests" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / f"test-{env}-{name}").write_bytes(image)


@pytest.fixture(scope="module")
def fake_xtf(tmp_path_factory):
    root = tmp_path_factory.mktemp("xtf")
    boom, boom_rip = crashing_guest()
    install(root, "good", "pv64", printing_guest(BANNER + "Test result: SUCCESS\n"))
    install(root, "warned", "pv64", printing_guest(BANNER + "Warning: odd\nTest result: SUCCESS with warnings\n"))
    install(root, "bad", "pv64", printing_guest(BANNER + "Fail: got 3, expected 4\nTest result: FAILURE\n"))
    install(root, "skipped", "pv64", printing_guest(BANNER + "Skip: no such feature\nTest result: SKIP\n"))
    install(root, "broken", "pv64", printing_guest(BANNER + "Error: the test itself is wrong\nTest result: ERROR\n"))
    install(root, "panicky", "pv64", printing_guest(BANNER + "PANIC: Failed to map shared_info: -38\n",
                                                    C.SHUTDOWN_crash))
    install(root, "silent", "pv64", printing_guest(BANNER))
    install(root, "boom", "pv64", boom)
    install(root, "spin", "pv64", spinning_guest())
    # a 32-bit HVM image is never loaded: trapless says why it cannot run it
    install(root, "good", "hvm32", b"not loaded")
    (root / "tests" / "good" / "test-pv64-good.cfg").write_text("name = 'not an image'\n")
    return root, boom_rip


def test_records_and_table(fake_xtf, engine, tmp_path, capsys):
    root, boom_rip = fake_xtf
    out = tmp_path / "xtf.json"
    status = cli.main(["xtf", "--xtf", str(root), "--engine", engine, "--timeout", "2",
                       "--json", str(out)])
    records = {(r["test"], r["env"]): r for r in json.loads(out.read_text())}
    assert all(r["engine"] == engine for r in records.values())
    got = {key: (r["status"], r["detail"]) for key, r in records.items()}
    assert got.pop(("boom", "pv64"))[0] == "crashed"
    assert f"at rip {boom_rip:#x} [0f 0b" in records[("boom", "pv64")]["detail"]
    assert got == {
        ("good", "pv64"): ("SUCCESS", ""),
        ("good", "hvm32"): ("not supported", xtf.NOT_SUPPORTED["hvm32"]),
        ("warned", "pv64"): ("SUCCESS", "with warnings"),
        ("bad", "pv64"): ("FAILURE", "Fail: got 3, expected 4"),
        ("skipped", "pv64"): ("SKIP", "Skip: no such feature"),
        ("broken", "pv64"): ("ERROR", "Error: the test itself is wrong"),
        ("panicky", "pv64"): ("crashed", "PANIC: Failed to map shared_info: -38"),
        ("silent", "pv64"): ("no verdict", "powered off without a test result"),
        ("spin", "pv64"): ("timed out", "timed out after 2 s"),
    }
    assert status == 1                  # something failed, errored, crashed, timed out ...
    table = capsys.readouterr().out
    assert "XTF on trapless" in table and "FAILURE: Fail: got 3, expected 4" in table
    assert table.endswith("10 runs: 1 ERROR, 1 FAILURE, 1 SKIP, 2 SUCCESS, 2 crashed, "
                          "1 no verdict, 1 not supported, 1 timed out\n")


def test_exit_status_is_zero_when_nothing_fails(fake_xtf, engine, capsys):
    root, _ = fake_xtf
    status = cli.main(["xtf", "--xtf", str(root), "--engine", engine, "--test", "good", "skipped"])
    assert status == 0
    assert capsys.readouterr().out.endswith("3 runs: 1 SKIP, 1 SUCCESS, 1 not supported\n")
    # a test that never reported counts as bad, as xtf-runner counts it a crash
    assert cli.main(["xtf", "--xtf", str(root), "--engine", engine, "--test", "silent"]) == 1


def test_bad_selection_is_one_line(tmp_path, capsys):
    assert cli.main(["xtf", "--xtf", str(tmp_path)]) == 2
    assert capsys.readouterr().err == (f"trapless: {tmp_path}: no XTF build there "
                                       "(run `make xtf`, or pass --xtf DIR)\n")


def test_a_panic_is_reported_however_the_guest_ended():
    class Fault:
        kind, reason, rip, message = "fault", 0, 0x1234, "triple fault"
    assert xtf.judge("PANIC: Failed to set trap table: -38\n", Fault()) == (
        "crashed", "PANIC: Failed to set trap table: -38")
    assert xtf.judge("", Fault(), lambda rip: b"\x0f\x0b") == (
        "crashed", "triple fault at rip 0x1234 [0f 0b]")


def test_verdict_lines_as_xtf_prints_them():
    """judge() on XTF's own output: console_io and the PV console ring both carry every
    line, so each appears twice; the first verdict counts."""
    class Stop:
        kind, reason, rip, message = "shutdown", C.SHUTDOWN_poweroff, 0, ""
    twice = "".join(line * 2 for line in [
        "--- Xen Test Framework ---\n", "Fail: XSA-123 still there\n", "Test result: FAILURE\n"])
    assert xtf.judge(twice, Stop()) == ("FAILURE", "Fail: XSA-123 still there")


REAL_XTF = xtf.DEFAULT_DIR


@pytest.mark.skipif(not (REAL_XTF / "tests").is_dir(),
                    reason=f"no XTF build at {REAL_XTF}: run `make xtf` first")
def test_real_xtf_images(engine, tmp_path):
    """Real XTF images: every pv64 image runs and gets a record with a status (what it is
    today is the table's business, not this test's); hvm64 boots as PVH, and XTF's own
    example passes there."""
    out = tmp_path / "xtf.json"
    cli.main(["xtf", "--engine", engine, "--timeout", "20", "--json", str(out),
              "--test", "example", "--test", "selftest"])
    records = json.loads(out.read_text())
    assert {(r["test"], r["env"]) for r in records} == {
        ("example", "pv64"), ("example", "hvm64"), ("selftest", "pv64"), ("selftest", "hvm64")}
    for r in records:
        assert r["status"] in set(xtf.VERDICTS) | {"crashed", "timed out", "no verdict",
                                                   "not supported"}, r
        assert r["status"] == "SUCCESS" or r["detail"], r
        if (r["test"], r["env"]) == ("example", "hvm64"):
            assert (r["status"], r["detail"]) == ("SUCCESS", ""), r


# What XTF's pv64 tests say today on both engines (docs/xtf.md's table). A change that
# makes one of them fail is a regression in trapless; more passing is progress.
PV64_PASSING = {
    "SUCCESS": ["cpuid", "debug-regs", "example", "memop-seg", "msr", "pv-iopl~hypercall",
                "pv-iopl~vmassist",
                "rtm-check", "selftest", "xsa-193", "xsa-212", "xsa-213", "xsa-224",
                "xsa-227", "xsa-232", "xsa-234", "xsa-255", "xsa-259", "xsa-265", "xsa-279",
                "xsa-260", "xsa-286", "xsa-296", "xsa-298", "xsa-316", "xsa-333", "xsa-339",
                "xsa-7"],
    "SKIP": ["argo", "cpuid-faulting", "livepatch-priv-check", "xsa-167", "xsa-182",
             "xsa-444"],
}
# ... and on one engine only, for what the other cannot do (docs/xtf.md says why):
# bt: TCG takes CR4.FSGSBASE; kvm: this host runs ring 3 natively (rdfsbase works
# whatever CR4 says, so kvm's PV CPUID policy hides FSGSBASE and XTF's own skip is
# followed by its #UD checks, which fail). On both, trapless decides #SS(0) against
# #GP(0) for a non-canonical address from the instruction (memop-seg): TCG raises #GP
# for all, this host #SS for an %ss: override. xsa-260's compat half runs on kvm's
# Unicorn twin of the vCPU (cext/bt_twin.c), as this host cannot run it.
PV64_PASSING_ON = {
    "bt": {"SUCCESS": ["pv-fsgsbase"]},
    "kvm": {"SUCCESS": []},
}


@pytest.mark.skipif(not (REAL_XTF / "tests").is_dir(),
                    reason=f"no XTF build at {REAL_XTF}: run `make xtf` first")
def test_xtf_pv64_tests_that_pass_keep_passing(engine, tmp_path):
    out = tmp_path / "xtf.json"
    expected = {name: status for status, names in PV64_PASSING.items() for name in names}
    expected.update({name: status for status, names in PV64_PASSING_ON[engine].items()
                     for name in names})
    if engines.compat_mode_unavailable(engine):
        del expected["xsa-260"]         # its compat half: kvm without Unicorn for the twin
    tests = sorted({name.split("~")[0] for name in expected})   # a test runs its variants
    cli.main(["xtf", "--engine", engine, "--env", "pv64", "--timeout", "30",
              "--json", str(out), "--test", *tests])
    got = {r["test"]: r["status"] for r in json.loads(out.read_text())}
    assert got == expected


def test_xtf_gives_each_test_the_vcpus_its_makefile_asks_for(tmp_path):
    """XTF's build writes `VCPUS := n` into a test's Makefile and `vcpus=n` into the
    config it generates beside the image; the generated config wins, 1 is the default."""
    tests = tmp_path / "tests"
    for name, makefile in (("two", "NAME := two\nVCPUS     := 2\n"), ("one", "NAME := one\n"),
                           ("cfg", "NAME := cfg\nVCPUS := 2\n")):
        (tests / name).mkdir(parents=True)
        (tests / name / "Makefile").write_text(makefile)
        (tests / name / f"test-pv64-{name}").write_bytes(b"\x7fELF")
    (tests / "cfg" / "test-pv64-cfg.cfg").write_text('name="test-pv64-cfg"\n\nvcpus=3\n')
    got = {i.test: i.vcpus for i in xtf.find_images(tmp_path)}
    assert got == {"two": 2, "one": 1, "cfg": 3}


# What XTF's hvm64 tests (booted as PVH) say today on each engine (docs/xtf.md's table).
# On kvm, events from ring 3 (exec_user's int $0x20, icebp, int3's DPL check, lm-ts's
# #TS) are delivered by trapless (cext/kvm.c, kvm_emul.c)
HVM64_COMMON_SUCCESS = ["cpuid", "debug-regs", "example", "invlpg~hap", "invlpg~shadow",
                        "lbr-tsx-vmentry", "lm-ts", "msr", "rtm-check", "selftest",
                        "xsa-168~shadow", "xsa-173~shadow", "xsa-195", "xsa-232", "xsa-277",
                        "xsa-278", "xsa-304", "xsa-308", "xsa-454", "xsa-463"]
# fpu-exception-emulation: no `hvm_fep`; on kvm its fnop, fwait, xgetbv and vmovups run
# in cext/kvm_emul.c. cpuid-faulting: not offered (bt), hidden (kvm: ring 3 runs
# natively there). swint-emulation: no `hvm_fep`. umip: not in either CPUID.
HVM64_COMMON_SKIP = ["argo", "cpuid-faulting", "fpu-exception-emulation",
                     "livepatch-priv-check", "nested-svm", "nested-vmx", "swint-emulation",
                     "umip", "xsa-170", "xsa-186", "xsa-196", "xsa-204", "xsa-261", "xsa-451",
                     "xsa-462", "xsa-470"]
HVM64_PASSING = {
    # kvm: memop-seg gets its AMD CPU's #SS where XTF expects #GP; xsa-269's 2^30-turn
    # ring-0 loop runs in KVM's instruction emulator (docs/xtf.md)
    "kvm": {"SUCCESS": HVM64_COMMON_SUCCESS, "SKIP": HVM64_COMMON_SKIP},
    # bt also: #SS for the stack segment (memop-seg), the ring-0 loop at TCG's speed
    "bt": {"SUCCESS": HVM64_COMMON_SUCCESS + ["memop-seg", "xsa-269"],
           "SKIP": HVM64_COMMON_SKIP},
}


@pytest.mark.skipif(not (REAL_XTF / "tests").is_dir(),
                    reason=f"no XTF build at {REAL_XTF}: run `make xtf` first")
def test_xtf_hvm64_tests_that_pass_keep_passing(engine, tmp_path):
    out = tmp_path / "xtf.json"
    passing = HVM64_PASSING[engine]
    names = sorted({name.split("~")[0] for names in passing.values() for name in names})
    cli.main(["xtf", "--engine", engine, "--env", "pvh64", "--timeout", "30",
              "--json", str(out), "--test", *names])
    got = {r["test"]: r["status"] for r in json.loads(out.read_text())}
    want = {name: status for status, names in passing.items() for name in names}
    assert {name: got.get(name) for name in want} == want


def test_variants_run_as_tests_of_their_own_with_their_command_line(engine, tmp_path):
    """A test with VARY-CFG in its Makefile is run once per variant, named
    name~variant as xtf-runner names it, with the cmdline its <variant>.cfg.in gives."""
    from abi import offsetof
    from guest_kernel.asm import qword, rdi
    p = PVProgram(guest_os="XTF-alike")
    p.print(BANNER)
    p.a.mov(rdi, qword["start_info_ptr"])
    p.a.add(rdi, offsetof("start_info", "cmd_line"))
    p.a.call("print_cstr")                  # the reason XTF prints: its command line
    p.print("\nTest result: SKIP\n")
    p.a.mov(eax, C.SHUTDOWN_poweroff)
    p.a.ret()
    install(tmp_path, "varied", "pv64", p.elf())
    d = tmp_path / "tests" / "varied"
    (d / "Makefile").write_text("NAME := varied\nVARY-CFG  := alpha beta\n")
    (d / "alpha.cfg.in").write_text('cmdline="first variant"\n')
    (d / "beta.cfg.in").write_text('cmdline="second variant"\n')
    out = tmp_path / "xtf.json"
    cli.main(["xtf", "--xtf", str(tmp_path), "--engine", engine, "--timeout", "20",
              "--json", str(out), "--test", "varied"])
    got = {(r["test"], r["status"], r["detail"]) for r in json.loads(out.read_text())}
    assert got == {("varied~alpha", "SKIP", "first variant"),
                   ("varied~beta", "SKIP", "second variant")}


def fake_xtf_source(root: Path, tests: dict[str, str]) -> Path:
    """An XTF checkout in miniature: build/gen.mk, and per test a Makefile that answers
    what scripts/xtf-build.sh asks (NAMEvar, TEST-ENVSvar) and 'builds' its pv64 image
    by copying a guest that prints the verdict text."""
    (root / "build").mkdir(parents=True)
    (root / "build" / "gen.mk").write_text("# XTF's generic rules\n")
    for name, text in tests.items():
        d = root / "tests" / name
        d.mkdir(parents=True)
        (d / "guest.elf").write_bytes(printing_guest(BANNER + text))
        (d / "Makefile").write_text(
            f"NAMEvar:\n\t@echo 'NAME = {name}'\n"
            "TEST-ENVSvar:\n\t@echo 'TEST-ENVS = pv64 pv32pae'\n"
            f"test-pv64-{name}: guest.elf\n\tcp guest.elf $@\n")
    return root


def test_src_builds_a_checkout_once_then_runs_it(tmp_path, capsys):
    src = fake_xtf_source(tmp_path / "xtf", {"good": "Test result: SUCCESS\n",
                                             "skipped": "Skip: nope\nTest result: SKIP\n"})
    out = tmp_path / "built"
    argv = ["xtf", "--src", str(src), "--xtf", str(out), "--engine", "bt", "--env", "pv64"]
    assert cli.main(argv + ["good"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"building XTF from {src} into {out} (a few minutes) ...\n")
    assert printed.endswith("1 runs: 1 SUCCESS\n")
    assert (out / "tests" / "good" / "test-pv64-good").is_file()
    assert not (src / "tests" / "good" / "test-pv64-good").exists()   # the checkout untouched
    # the same source again: no second build
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "building" not in printed and printed.endswith("2 runs: 1 SKIP, 1 SUCCESS\n")


def test_src_takes_a_tarball(tmp_path, capsys):
    import tarfile
    src = fake_xtf_source(tmp_path / "xtf-main", {"good": "Test result: SUCCESS\n"})
    tarball = tmp_path / "xtf.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(src, arcname="xtf-main")
    assert cli.main(["xtf", "--src", str(tarball), "--xtf", str(tmp_path / "b"),
                     "--engine", "bt", "--test", "good"]) == 0
    assert capsys.readouterr().out.endswith("1 runs: 1 SUCCESS\n")


def test_src_that_is_not_xtf_or_does_not_build_is_one_line(tmp_path, capsys):
    assert cli.main(["xtf", "--src", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"trapless: {tmp_path}: not an XTF checkout (no build/gen.mk)\n"
    src = fake_xtf_source(tmp_path / "xtf", {"good": "Test result: SUCCESS\n"})
    (src / "tests" / "good" / "guest.elf").unlink()          # its image cannot be made
    assert cli.main(["xtf", "--src", str(src), "--xtf", str(tmp_path / "b")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"trapless: building XTF from {src} failed: ") and err.count("\n") == 1
    # an unbuilt checkout given as --xtf says how to build it
    assert cli.main(["xtf", "--xtf", str(src)]) == 2
    assert capsys.readouterr().err == (f"trapless: {src}: an XTF checkout that is not built "
                                       f"(pass it as --src {src} to build and run it)\n")
