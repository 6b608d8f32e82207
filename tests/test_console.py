"""`python -m hypervisor.console` driven as a person drives it (pexpect on a real pty), and
as a script drives it (-c)."""
import os
from pathlib import Path
import re
import subprocess
import sys

import pexpect
import pytest

from guest_kernel.pv_kernel import build_pv_kernel
from helpers import wait_for

ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[=>()][0-9A-Za-z]?)")
PROMPT = "trapless> "
# one `top` row: id, name, state, CPU%, exits/s, pending, memory, hypercalls/s: by name
TOP_ROW = re.compile(r"^\s*(\d+)\s+(\w+)\s+(running|blocked|paused)\s+([\d.]+)\s+(\d+)\s+(\d+)"
                     r"\s+(\d+)\s+(\d+)(?::\s+(.*?))?\s*$", re.M)


def plain(text: str) -> str:
    return ANSI.sub("", text).replace("\r", "")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    path = tmp_path_factory.mktemp("console") / "pv-kernel.elf"
    path.write_bytes(build_pv_kernel())
    return path


@pytest.fixture
def configs(tmp_path, kernel, engine):
    """a.cfg, b.cfg, c.cfg: small interactive PV domains on the engine under test."""
    for name in "abc":
        (tmp_path / f"{name}.cfg").write_text(
            f'# domain {name}\nname = "{name}"\nkernel = "{kernel}"\nmemory = 16\n'
            f'cmdline = "interactive"\nengine = "{engine}"\n')
    return tmp_path


def env(tmp_path):
    return {**os.environ, "TERM": "xterm", "NO_COLOR": "1",
            "TRAPLESS_HISTORY": str(tmp_path / "history")}


def spawn(tmp_path) -> pexpect.spawn:
    child = pexpect.spawn(sys.executable, ["-m", "hypervisor.console"], cwd=str(tmp_path),
                          env=env(tmp_path), dimensions=(50, 140), timeout=15,
                          encoding="utf-8")
    child.expect_exact(PROMPT)
    return child


def command(child, line: str) -> str:
    """Type a command line; return what it printed (ANSI codes and CRs removed)."""
    child.sendline(line)
    child.expect_exact(PROMPT)
    return plain(child.before).split("\n", 1)[1] if "\n" in child.before else ""


def process_counts(info: str) -> tuple[int, int]:
    m = re.search(r"threads (\d+), open fds (\d+)", info)
    return int(m.group(1)), int(m.group(2))


def task_names(pid: int) -> list[str]:
    return sorted(Path(f"/proc/{pid}/task/{t}/comm").read_text().strip()
                  for t in os.listdir(f"/proc/{pid}/task"))


def fd_targets(pid: int) -> list[str]:
    return sorted(os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd"))


def test_a_person_runs_three_domains(configs, engine):
    child = spawn(configs)
    try:
        info = command(child, "info")
        assert re.search(rf"engine {engine}\s+available", info)
        assert re.search(r"ABI\s+Xen 4\.19\.0-trapless x86-64 PV", info)
        base_threads, base_fds = process_counts(info)

        for domid, name in enumerate("abc", 1):
            assert command(child, f"create {name}.cfg").strip() == f"created domain {domid} ({name})"

        rows = re.findall(r"^\s*(\d+)\s+(\w+)\s+(\w+)\s+(\d+)\s+(\d+)\s+([\d.]+)\s+(\w+)\s*$",
                          command(child, "list"), re.M)
        assert [(i, n, m, c, e) for i, n, _, m, c, _, e in rows] == [
            ("1", "a", "16", "1", engine), ("2", "b", "16", "1", engine),
            ("3", "c", "16", "1", engine)]
        assert all(state in ("running", "blocked") for _, _, state, _, _, _, _ in rows)

        # attach to b and talk to its kernel; Ctrl-] comes back to the shell
        child.sendline("console b")
        child.expect_exact("Connected to domain 2 (b). Ctrl-] detaches.")
        child.expect_exact("pv> ")
        child.send("echo hello from the keyboard\r")
        child.expect_exact("echo hello from the keyboard\r\nhello from the keyboard\r\npv> ")
        child.send("ticks\r")
        child.expect(r"ticks: (\d+)\r\npv> ")
        assert int(child.match.group(1)) > 0
        child.send("\x1d")
        child.expect_exact("[detached: console of domain 2 (b) closed]")
        child.expect_exact(PROMPT)
        assert command(child, "console nosuch").strip() == "error: no domain 'nosuch' (see list)"

        assert command(child, "destroy a").strip() == "domain 1 (a) destroyed"
        assert [r.split()[1] for r in command(child, "list").splitlines()
                if re.match(r"^\s*\d+\s", r)] == ["b", "c"]

        # top: b and c tick at 100 Hz (one SCHEDOP_block per tick); a is gone; q leaves
        child.sendline("top")
        child.expect_exact("q leaves")
        child.expect(r"\n\s*3\s+c\s+\w+\s+[\d.]+\s+\d+\s+\d+\s+\d+\s+\d+[^\r\n]*")  # a frame
        shown = child.before + child.after
        child.send("q")
        child.expect_exact(PROMPT)
        shown = plain(shown + child.before)
        last = {}
        for m in TOP_ROW.finditer(shown):
            last[m.group(2)] = m
        assert sorted(last) == ["b", "c"], shown
        for m in last.values():
            # exits per tick: the SCHEDOP_block and the iret hypercall of the upcall
            assert 50 <= float(m.group(8)) <= 300, m.group(0)
            assert re.search(r"sched_op=(\d+)", m.group(9)), m.group(0)
            assert 50 <= int(re.search(r"sched_op=(\d+)", m.group(9)).group(1)) <= 150
            assert int(m.group(7)) == 16

        # trace: c's last hypercalls, decoded
        traced = command(child, "trace c 5")
        assert "domain 3 (c): last 5 hypercalls" in traced
        calls = re.findall(r"^\s*(\d+)\s+([\d.]+)\s+(\S+\(.*\))\s+(\S+)\s*$", traced, re.M)
        assert len(calls) == 5
        seqs = [int(seq) for seq, _, _, _ in calls]
        assert seqs == list(range(seqs[0], seqs[0] + 5))
        assert ("sched_op(SCHEDOP_block, 0)", "0") in [(c, r) for _, _, c, r in calls]

        assert command(child, "bogus 1 2").strip() == "error: unknown command 'bogus' (try help)"
        assert command(child, "trace c lots").strip() == \
            "error: trace: N = 'lots': must be a number from 1 to 256"
        log = command(child, "dmesg")
        assert re.search(r"\] domain 1 \(a\) destroyed$", log, re.M)

        # destroying the rest gives back every thread and fd the domains had (the
        # scheduler's workers end once they have had nothing to run for 2 s). At most
        # as many as before, not exactly as many: a worker of the shell's own start may
        # still be alive when the first count is taken (seen: 6 threads then, 5 at the
        # end, the sixth an idle worker that had ended)
        command(child, "destroy b")
        command(child, "destroy c")

        def given_back() -> bool:
            threads, fds = process_counts(command(child, "info"))
            return threads <= base_threads and fds <= base_fds
        assert wait_for(given_back, timeout=30), \
            ((base_threads, base_fds), process_counts(command(child, "info")),
             task_names(child.pid), fd_targets(child.pid))
        command(child, "create b.cfg")
        child.sendline("quit")
        child.expect(pexpect.EOF, timeout=10)
    finally:
        child.close()
    assert child.exitstatus == 0


def test_tab_completion_history_and_ctrl_d(configs):
    child = spawn(configs)
    try:
        child.sendline("create a.c\t")               # completes the file name
        child.expect_exact("created domain 1 (a)")
        child.expect_exact(PROMPT)
        child.send("paus\t")                         # completes the command ...
        child.send("a\t\r")                          # ... and the domain name
        child.expect_exact("domain 1 (a) paused")
        child.expect_exact(PROMPT)
        child.send("\x1b[A\x1b[A\r")                 # up twice in history: create a.cfg again
        child.expect_exact("error: name 'a': a domain with that name exists")
        child.expect_exact(PROMPT)
        child.sendeof()
        child.expect(pexpect.EOF, timeout=10)
    finally:
        child.close()
    assert child.exitstatus == 0
    # what was run, as completed (completion leaves a space after each word)
    assert (configs / "history").read_text().splitlines() == [
        "create a.cfg ", "pause a ", "create a.cfg "]


def run_script(cwd, commands: str):
    return subprocess.run([sys.executable, "-m", "hypervisor.console", "-c", commands],
                          cwd=cwd, capture_output=True, text=True, timeout=60, env=env(cwd))


def test_scripted_commands(configs, engine):
    r = run_script(configs, "create a.cfg; create b.cfg memory=32 vcpus=2 maxvcpus=4; list")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""
    lines = r.stdout.splitlines()
    assert lines[:2] == ["created domain 1 (a)", "created domain 2 (b)"]
    rows = [line.split() for line in lines[2:] if re.match(r"^\s*\d+\s", line)]
    assert [(row[0], row[1], row[3], row[4], row[6]) for row in rows] == [
        ("1", "a", "16", "1", engine), ("2", "b", "32", "4", engine)]
    assert all(row[2] in ("running", "blocked") for row in rows)


def test_scripted_errors_are_one_line_each_and_the_script_goes_on(configs):
    (configs / "bad.cfg").write_text('name = "bad"\nmemroy = 8\n')
    r = run_script(configs, "create bad.cfg; create a.cfg on_crash=reboot; "
                            "create a.cfg kernel=bad.cfg; create a.cfg; "
                            "pause zz; trace a 999; console a; list")
    assert r.returncode == 1
    assert r.stderr.splitlines() == [
        "error: bad.cfg:2: unknown key 'memroy' (known: cmdline, disk, engine, extra, "
        "kernel, maxmem, maxvcpus, memory, name, on_crash, on_poweroff, on_reboot, ramdisk, "
        "type, vcpus, vif)",
        "error: command line: on_crash = 'reboot': must be destroy, restart or preserve",
        "error: bad.cfg: not an ELF file (bad magic)",
        "error: no domain 'zz' (see list)",
        "error: trace: N = '999': must be a number from 1 to 256",
        "error: console: needs a terminal (stdin is not one)",
    ]
    assert r.stdout.splitlines()[0] == "created domain 1 (a)"
    assert re.search(r"^\s*1\s+a\s+(running|blocked)\s+16\s", r.stdout, re.M)


def test_commands_piped_on_stdin(configs):
    r = subprocess.run([sys.executable, "-m", "hypervisor.console"], cwd=configs,
                       input="create a.cfg\nhelp destroy\nquit\nlist\n", capture_output=True,
                       text=True, timeout=60, env=env(configs))
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines() == [
        "created domain 1 (a)",
        "destroy DOM",
        "    stop the domain at once and free everything it had",
    ]
