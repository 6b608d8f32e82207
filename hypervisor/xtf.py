"""`python -m hypervisor xtf`: run XTF (the Xen Test Framework) images on trapless and
tabulate XTF's own verdicts, test x engine.

XTF builds one image per test and environment, `tests/<name>/test-<env>-<name>`. Each
image reports through one helper (common/report.c) and ends with the line
"Test result: SUCCESS|SKIP|ERROR|FAILURE" ("SUCCESS with warnings" too); the reason of
a SKIP, ERROR or FAILURE is what the test printed just before it. When no verdict comes,
the cell says why trapless stopped the guest: crashed (a fault such as a triple fault,
or the guest's own panic), timed out, or not supported (an environment trapless cannot
boot yet). Nothing is skipped silently, and no test is treated specially: a test that
fails means trapless is wrong or lacks something.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from abi import C

from . import engines
from .errors import ConfigError, TraplessError

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "build" / "xtf"
BUILD_SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "xtf-build.sh"
BUILD_ENVS = ("pv64", "hvm64")  # what trapless runs (hvm64 boots as PVH); as `make xtf`
BUILT_FROM = ".trapless-built-from"     # in a build: which source it was built from
MEMORY_MIB = 128            # XTF's config/default-*.cfg.in
VERDICTS = ("SUCCESS", "SKIP", "ERROR", "FAILURE")
# xtf-runner counts a test that never reported as a crash; so do we.
BAD = {"ERROR", "FAILURE", "crashed", "timed out", "no verdict"}
RESULT = re.compile(r"^Test result: (SUCCESS|SKIP|ERROR|FAILURE)( with warnings)?\s*$", re.M)
PANIC = re.compile(r"^PANIC: (.*)$", re.M)
IMAGE = re.compile(r"^test-([a-z0-9]+)-(.+)$")
ENV_NAME = re.compile(r"^(pv|hvm|pvh)(32|64)[a-z]*$")          # pv64, hvm32pae, pvh64, ...
VARY_CFG = re.compile(r"^VARY-CFG\s*:=\s*(.*?)\s*$", re.M)     # a test's Makefile
MAKE_VCPUS = re.compile(r"^VCPUS\s*:=\s*(\d+)", re.M)           # ... and its vCPUs
CFG_VCPUS = re.compile(r"^vcpus\s*=\s*(\d+)", re.M)              # a generated .cfg
CFG_CMDLINE = re.compile(r'^cmdline\s*=\s*"([^"]*)"', re.M)      # <variant>.cfg.in

# What kind of guest each XTF environment is, and why trapless cannot run a kind yet.
# pv*: Xen PV guests. hvm*: HVM guests, which trapless would boot as PVH at their
# PHYS32_ENTRY note. 32-bit PV (pv32pae) needs a compat (32-bit) PV ABI.
NOT_SUPPORTED = {
    "hvm32": "32-bit HVM images need Xen's 32-bit hypercall ABI for their structures "
             "and 32-bit paging; trapless's PVH guests run 64-bit (hvm64)",
    "pv32": "32-bit PV guests need Xen's compat ABI; trapless runs 64-bit PV only",
}


def why_not_supported(env: str) -> str | None:
    if env.startswith("pv64") or env == "hvm64":
        return None             # hvm64 boots as a PVH guest, at its PHYS32_ENTRY note
    for prefix, why in NOT_SUPPORTED.items():
        if env.startswith(prefix):
            return why
    return f"unknown XTF environment {env!r}"


@dataclass
class Record:
    """One (test, environment, engine) run."""
    test: str
    env: str
    engine: str
    status: str             # an XTF verdict, or crashed / timed out / not supported / no verdict
    detail: str             # XTF's reason, or trapless's stop reason
    seconds: float
    image: str

    @property
    def bad(self) -> bool:
        return self.status in BAD


@dataclass
class Image:
    test: str                   # the test's name; name~variant for a variant
    env: str
    path: Path
    cmdline: str = ""           # a variant's command line (its <variant>.cfg.in)
    vcpus: int = 1              # what the test's config gives the domain (xl's vcpus=)


def variants(test_dir: Path, xtf_dir: Path) -> list[tuple[str, str]]:
    """A test's variants as XTF's build names them (VARY-CFG in its Makefile), each with
    the command line its <variant>.cfg.in gives the guest: xtf-runner runs each as a test
    of its own (test-pv64-pv-iopl~hypercall). [] for a test without variants."""
    try:
        m = VARY_CFG.search((test_dir / "Makefile").read_text(errors="replace"))
    except OSError:
        return []
    out = []
    for variant in (m.group(1).split() if m else []):
        cmdline = ""
        for cfg in (test_dir / f"{variant}.cfg.in", xtf_dir / "config" / f"{variant}.cfg.in"):
            if cfg.is_file():
                c = CFG_CMDLINE.search(cfg.read_text(errors="replace"))
                cmdline = c.group(1) if c else ""
                break
        out.append((variant, cmdline))
    return out


def test_vcpus(image: Path) -> int:
    """The vCPUs XTF gives a test's domain: `vcpus=` of the config XTF generated beside
    the image (test-<env>-<name>.cfg, from config/default-*.cfg.in), else the VCPUS of
    the test's Makefile, which that config is made from (build/gen.mk: 1 if unset)."""
    for path, pattern in ((image.with_name(image.name + ".cfg"), CFG_VCPUS),
                          (image.parent / "Makefile", MAKE_VCPUS)):
        try:
            m = pattern.search(path.read_text(errors="replace"))
        except OSError:
            continue
        if m:
            return int(m.group(1))
    return 1


# XTF builds no PVH environment: its hvm64 images carry a PHYS32_ENTRY note and trapless
# boots them as PVH guests, so `--env pvh64` names those images.
ENV_ALIASES = {"pvh64": "hvm64"}


def find_images(xtf_dir: Path, envs: list[str] | None = None,
                tests: list[str] | None = None) -> list[Image]:
    """Every built image under xtf_dir/tests, optionally only these envs and tests."""
    root = xtf_dir / "tests"
    if not root.is_dir():
        raise ConfigError(f"{xtf_dir}: no XTF build there (run `make xtf`, or pass --xtf DIR)")
    if (xtf_dir / "build" / "gen.mk").is_file() and not any(root.glob("*/test-*")):
        raise ConfigError(f"{xtf_dir}: an XTF checkout that is not built "
                          f"(pass it as --src {xtf_dir} to build and run it)")
    found = []
    for path in sorted(root.glob("*/test-*")):
        m = IMAGE.match(path.name)
        if not m or path.suffix == ".cfg" or not path.is_file():
            continue
        env, name = m.groups()
        if name != path.parent.name:
            continue
        if envs and env not in {ENV_ALIASES.get(e, e) for e in envs}:
            continue
        runs = [(f"{name}~{v}", cmdline) for v, cmdline in variants(path.parent, xtf_dir)]
        for test, cmdline in runs or [(name, "")]:
            if tests and name not in tests and test not in tests:
                continue
            found.append(Image(test, env, path, cmdline, test_vcpus(path)))
    if tests:
        named = {i.test for i in found} | {i.test.split("~")[0] for i in found}
        missing = sorted(set(tests) - named)
        if missing:
            raise ConfigError(f"no built XTF image for test {', '.join(missing)} in {root}")
    if not found:
        raise ConfigError(f"no XTF images in {root} for environment {', '.join(envs or ['any'])}")
    return found


def source_fingerprint(src: Path) -> str:
    """Says which source (and which state of it) a build came from: the tarball's path,
    size and time, or the checkout's path and its newest file's time."""
    if src.is_dir():
        newest = 0
        for root, dirs, files in os.walk(src):
            dirs[:] = [d for d in dirs if d != ".git"]
            for f in files:
                try:
                    newest = max(newest, os.lstat(os.path.join(root, f)).st_mtime_ns)
                except OSError:
                    pass
        return f"checkout {src} {newest}"
    st = src.stat()
    return f"tarball {src} {st.st_size} {st.st_mtime_ns}"


def build(src: Path, dest: Path, out=None) -> None:
    """Builds XTF from a checkout or tarball into dest with the system toolchain (what
    `make xtf` does), unless dest already holds a build of that same source. A build that
    fails is one line: the build's own last complaint."""
    src = src.expanduser().resolve()
    if not src.exists():
        raise ConfigError(f"{src}: no such XTF checkout or tarball (get one with "
                          "`git clone https://xenbits.xen.org/git-http/xtf.git`)")
    if src.is_dir() and not (src / "build" / "gen.mk").is_file():
        raise ConfigError(f"{src}: not an XTF checkout (no build/gen.mk)")
    stamp = dest / BUILT_FROM
    want = source_fingerprint(src) + " envs " + " ".join(BUILD_ENVS)
    try:
        if stamp.read_text() == want:
            return
    except OSError:
        pass
    if out:
        out(f"building XTF from {src} into {dest} (a few minutes) ...")
    done = subprocess.run(["sh", str(BUILD_SCRIPT), str(src), str(dest), *BUILD_ENVS],
                          capture_output=True, text=True)
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr + done.stdout).splitlines() if ln.strip()]
        raise ConfigError(f"building XTF from {src} failed: "
                          f"{lines[-1].strip() if lines else f'exit status {done.returncode}'}")
    stamp.write_text(want)


def reason_before(console: str, end: int) -> str:
    """The last line the test printed before position end: XTF's reason for a verdict."""
    lines = [ln.strip() for ln in console[:end].splitlines() if ln.strip()]
    lines = [ln for ln in lines if not RESULT.match(ln)]
    return lines[-1] if lines else ""


def judge(console: str, stop, code_at=lambda rip: b"") -> tuple[str, str]:
    """(status, detail) from what the guest printed and how it stopped; code_at(rip)
    gives the bytes there, shown with a fault so the table says what the guest ran."""
    m = RESULT.search(console)
    if m:
        status = m.group(1)
        if status == "SUCCESS":
            return status, "with warnings" if m.group(2) else ""
        return status, reason_before(console, m.start())
    panic = PANIC.search(console)
    if panic:                           # the guest's own last words beat how it ended
        return "crashed", f"PANIC: {panic.group(1).strip()}"
    if stop.kind == "fault":
        code = code_at(stop.rip)
        return "crashed", f"{stop.message} at rip {stop.rip:#x}" + (f" [{code.hex(' ')}]" if code else "")
    if stop.kind == "stopped":
        return "timed out", stop.message
    if stop.kind == "shutdown":
        if stop.reason != C.SHUTDOWN_poweroff:
            return "crashed", f"shut down ({stop.shutdown_name}) without a verdict"
        return "no verdict", "powered off without a test result"
    return "crashed", stop.message or stop.kind


def run_one(image: Image, engine: str, timeout: float) -> Record:
    from .domain import Domain

    why = why_not_supported(image.env)
    if why:
        return Record(image.test, image.env, engine, "not supported", why, 0.0, str(image.path))
    start = time.monotonic()
    try:
        dom = Domain(image.path, memory_mib=MEMORY_MIB, engine=engine, name=image.path.name,
                     cmdline=image.cmdline, vcpus=image.vcpus)
    except TraplessError as e:
        return Record(image.test, image.env, engine, "not supported", f"cannot load: {e}",
                      0.0, str(image.path))

    def code_at(rip: int) -> bytes:
        try:
            return dom.read_guest(rip, 8)
        except ValueError:              # outside the start-of-day region
            return b""

    with dom:
        stop = dom.run(timeout=timeout)
        console = dom.console_output.decode(errors="replace")
        status, detail = judge(console, stop, code_at)
    return Record(image.test, image.env, engine, status, detail,
                  round(time.monotonic() - start, 3), str(image.path))


STYLE = {"SUCCESS": "green", "SKIP": "yellow", "not supported": "yellow"}


def table(records: list[Record], engine_names: list[str]):
    from rich.table import Table        # only when a table is printed: `run` starts faster
    t = Table(title="XTF on trapless")
    t.add_column("test")
    t.add_column("env")
    for e in engine_names:
        t.add_column(e)
    cells: dict[tuple[str, str], dict[str, Record]] = {}
    for r in records:
        cells.setdefault((r.test, r.env), {})[r.engine] = r
    for (test, env), by_engine in cells.items():
        row = []
        for e in engine_names:
            r = by_engine.get(e)
            if r is None:
                row.append("-")
                continue
            text = r.status + (f": {r.detail}" if r.detail else "")
            style = STYLE.get(r.status, "red")
            row.append(f"[{style}]{escape(text)}[/{style}]")
        t.add_row(test, env, *row)
    return t


def escape(text: str) -> str:
    from rich.markup import escape as rich_escape
    return rich_escape(text)


def summary(records: list[Record]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    return f"{len(records)} runs: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))


def main(args) -> int:
    if not args.timeout > 0:
        raise ConfigError(f"--timeout {args.timeout:g}: must be more than 0 seconds")
    xtf_dir = Path(args.xtf) if args.xtf else DEFAULT_DIR
    if args.src:
        build(Path(args.src), xtf_dir, out=print)
    # `--env pv64 NAME` hands NAME to --env (it takes several): what is not the name of an
    # XTF environment there is a test.
    envs = [e for e in args.env or [] if ENV_NAME.match(e)]
    tests = (args.test or []) + (args.tests or []) + [e for e in args.env or [] if e not in envs]
    images = find_images(xtf_dir, envs or None, tests or None)
    if args.engine:
        engines.choose(args.engine)        # one line if it cannot run here
        engine_names = [args.engine]
    else:
        engine_names = engines.available()
        if not engine_names:
            engines.choose()               # raises with every engine's reason
    from rich.console import Console
    console = Console()
    for name in engines.ENGINES:
        if name not in engine_names and not args.engine:
            console.print(f"engine {name} not run: {engines.why_unavailable(name)}")
    records = []
    for image in images:
        for engine in engine_names:
            records.append(run_one(image, engine, args.timeout))
    console.print(table(records, engine_names))
    print(summary(records))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps([asdict(r) for r in records], indent=1) + "\n")
    return 1 if any(r.bad for r in records) else 0


def add_parser(sub) -> None:
    """The `xtf` subcommand of python -m hypervisor."""
    p = sub.add_parser("xtf", help="run XTF (Xen Test Framework) images: a test x engine table "
                       "of XTF's verdicts",
                       epilog="exit status: 0 if no test failed, errored, crashed, timed out "
                              "or ended without a verdict; 1 otherwise; 2 usage error")
    p.add_argument("tests", nargs="*", metavar="TEST", help="only these tests (as --test)")
    p.add_argument("--src", metavar="DIR|TARBALL",
                   help="an XTF checkout or tarball: build it with the system gcc into the "
                        "--xtf directory first (skipped when that build is of this source)")
    p.add_argument("--xtf", metavar="DIR", help=f"a built XTF tree (default: {DEFAULT_DIR}, "
                   "made by `make xtf` or --src)")
    p.add_argument("--env", action="extend", nargs="+", metavar="ENV",
                   help="only these XTF environments, e.g. pv64 hvm64 (pvh64: the hvm64 "
                        "images, which boot as PVH guests)")
    p.add_argument("--test", action="extend", nargs="+", metavar="NAME", help="only these tests")
    p.add_argument("--engine", choices=list(engines.ENGINES),
                   help="only this engine (default: every engine this host can run)")
    p.add_argument("--timeout", type=float, default=30.0, metavar="S",
                   help="seconds per test before it counts as timed out (default 30)")
    p.add_argument("--json", metavar="PATH", help="write one record per (test, env, engine)")
    p.set_defaults(func=main)
