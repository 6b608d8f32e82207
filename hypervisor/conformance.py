"""`python -m hypervisor conformance`: the hypercall ABI conformance suite as a report.

Runs every case in tests/conformance on every available engine (the `engine` fixture
does the parametrizing), prints the hypercall x sub-op x engine table and, with
--json PATH, writes one record per checked case: hypercall, subop, engine, case,
status (passed / failed / not implemented), expected, actual. The fuzz case makes
--fuzz-calls random hypercalls (default 100,000) per engine.

The suite checks whatever `hypervisor._hv` Python imports: to check another build,
install it into the environment (pip install -e /path/to/that/checkout) and run this.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError

SUITE = Path(__file__).resolve().parent.parent / "tests" / "conformance"


def main(args) -> int:
    import pytest

    if not SUITE.is_dir():
        raise ConfigError(f"no conformance suite at {SUITE} (it ships in a trapless checkout)")
    os.environ["TRAPLESS_FUZZ_CALLS"] = str(args.fuzz_calls)
    if args.seed is not None:
        os.environ["TRAPLESS_FUZZ_SEED"] = str(args.seed)
    argv = [str(SUITE), "-q", "-p", "no:cacheprovider", "--conformance-report"]
    if args.json:
        argv += ["--conformance-json", str(args.json)]
    return int(pytest.main(argv))
