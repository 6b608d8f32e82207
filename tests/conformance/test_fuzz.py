"""The hypercall fuzzer (guest_kernel/fuzz.py): random hypercalls from a seeded PRNG.

The hypervisor never crashes, every call returns, every result is a success or a Xen
errno, the guest's own code and data outside the buffers it passed are untouched, and
the domain's page-table invariants still hold afterwards. TRAPLESS_FUZZ_CALLS sets
the number of calls (`make test`: 3,000; `make conformance`: 100,000) and
TRAPLESS_FUZZ_SEED replays a seed; the seed is in every failure message.
"""
import os
import random

from guest_kernel.fuzz import fuzz_guest

from mm_guest import audit

CALLS = int(os.environ.get("TRAPLESS_FUZZ_CALLS", "3000"))
SEED = int(os.environ.get("TRAPLESS_FUZZ_SEED", "0"), 0) or random.SystemRandom().getrandbits(63)


def test_random_hypercalls_leave_hypervisor_and_guest_intact(run_cases):
    print(f"fuzz seed {SEED:#x}, {CALLS} calls")
    run = run_cases(fuzz_guest(SEED, CALLS), timeout=600)
    replay = f"(replay: TRAPLESS_FUZZ_SEED={SEED:#x} TRAPLESS_FUZZ_CALLS={CALLS})"
    assert run["fuzz_calls"] == CALLS, replay
    assert run["fuzz_bad_results"] == 0, replay
    assert run["fuzz_state_changed"] == 0, replay
    assert audit(run.domain) == "", replay
    counters = run.domain.counters()
    assert counters.exits["hypercall"] >= CALLS, replay


def test_the_same_seed_replays_the_same_results(run_cases):
    first = run_cases(fuzz_guest(SEED, 300))
    second = run_cases(fuzz_guest(SEED, 300))
    assert first.results["fuzz_digest"] == second.results["fuzz_digest"], f"seed {SEED:#x}"
