"""Fixtures shared by the whole suite: the engines to run on, and running a guest."""
from __future__ import annotations

import pytest

from hypervisor import engines

ALL_ENGINES = list(engines.ENGINES)


def engine_params():
    """One pytest param per engine; an engine this host cannot run is skipped with why."""
    params = []
    for name in ALL_ENGINES:
        why = engines.why_unavailable(name)
        marks = [pytest.mark.skip(reason=f"engine {name} unavailable: {why}")] if why else []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


@pytest.fixture(params=engine_params())
def engine(request) -> str:
    return request.param


@pytest.fixture
def run_guest(engine):
    """run_guest(image, cmdline="", memory_mib=64, console_input=b"") -> (StopInfo, console
    text, Domain). console_input is queued for CONSOLEIO_read before the guest starts."""
    from hypervisor.domain import Domain

    domains = []

    def run(image, cmdline: str = "", memory_mib: int = 64, timeout: float = 30,
            console_input: bytes = b"", **domain_options):
        dom = Domain(image, memory_mib=memory_mib, cmdline=cmdline, engine=engine,
                     **domain_options)
        domains.append(dom)
        if console_input:
            assert dom.send_input(console_input) == len(console_input)
        stop = dom.run(timeout=timeout)
        return stop, dom.console_output.decode(errors="replace"), dom

    yield run
    for dom in domains:
        dom.destroy()
