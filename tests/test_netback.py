"""The PV network device: trapless's backend (cext/netback.c) and its software bridges,
with the frontend of trapless's own PV kernel (guest_kernel/netfront.py) on both ends.
Domains come from xl config files through the toolstack, as a user makes them; one
pings another on a bridge and both print what they sent and received, on every engine."""
from __future__ import annotations

import pytest

from abi import C
from guest_kernel.pv_kernel import build_pv_kernel
from hypervisor import config, xenstore
from hypervisor._hv import ffi, lib
from hypervisor.toolstack import Toolstack

from helpers import wait_for

MAC_A, MAC_B, MAC_C = "00:16:3e:00:00:0a", "00:16:3e:00:00:0b", "00:16:3e:00:00:0c"


@pytest.fixture(scope="module")
def kernel(tmp_path_factory):
    path = tmp_path_factory.mktemp("net") / "pv-kernel.elf"
    path.write_bytes(build_pv_kernel())
    return path


@pytest.fixture
def ts():
    toolstack = Toolstack()
    yield toolstack
    toolstack.shutdown()


def create(ts, tmp_path, kernel, engine, name, mac, cmdline, bridge="xenbr0"):
    """A domain from an xl config file written the way a user writes one."""
    cfg = tmp_path / f"{name}.cfg"
    cfg.write_text(f'name = "{name}"\nkernel = "{kernel}"\nmemory = 32\n'
                   f'engine = "{engine}"\ncmdline = "netfront {cmdline}"\n'
                   f"vif = [ 'mac={mac}, bridge={bridge}' ]\n")
    return ts.create(config.load(cfg))


def stats(domid: int, devid: int = 0):
    s = ffi.new("struct hv_netback_stats *")
    assert lib.hv_netback_stats(domid, devid, s) == 0
    return s


def head(domid: int, name: str, mac: str, ip: str) -> str:
    return (f"netfront: device 0, backend /local/domain/0/backend/vif/{domid}/0, mac {mac}\n"
            f"netfront: connected, ip {ip}\n")


def pinger_lines(n: int, peer: str = "10.0.0.2", mac: str = MAC_B) -> str:
    out = f"netfront: arp who-has {peer}\nnetfront: {peer} is at {mac}\n"
    for i in range(1, n + 1):
        out += (f"netfront: echo request to {peer} icmp_seq={i}\n"
                f"netfront: echo reply from {peer} icmp_seq={i}\n")
    return out + f"netfront: {n} sent, {n} received\n"


def netfront_part(rec) -> str:
    """The console from the frontend's first line on (after the kernel's banner)."""
    text = rec.console_text
    return text[text.index("netfront: "):]


def test_two_domains_ping_each_other(ts, tmp_path, kernel, engine):
    b = create(ts, tmp_path, kernel, engine, "b", MAC_B, "ip=10.0.0.2")
    assert wait_for(lambda: "connected" in b.console_text, 60), b.console_text
    a = create(ts, tmp_path, kernel, engine, "a", MAC_A, "ip=10.0.0.1 peer=10.0.0.2 pings=3")
    assert wait_for(lambda: a.gone, 120), a.console_text
    assert netfront_part(a) == head(a.domid, "a", MAC_A, "10.0.0.1") + pinger_lines(3)
    assert wait_for(lambda: b.console_text.count("replied") == 4)
    assert netfront_part(b) == head(b.domid, "b", MAC_B, "10.0.0.2") + (
        "netfront: arp request from 10.0.0.1, replied\n"
        + "".join(f"netfront: echo request from 10.0.0.1 icmp_seq={i}, replied\n"
                  for i in range(1, 4)))
    s = stats(b.domid)
    # b got a's ARP request (a broadcast) and three echo requests, and sent four answers
    assert (s.state, s.rx_frames, s.tx_frames) == (C.XenbusStateConnected, 4, 4)
    assert (s.rx_bytes, s.tx_bytes) == (42 + 3 * 74, 42 + 3 * 74)
    assert (s.tx_errors, s.rx_dropped, s.bad_grants, s.ring_broken) == (0, 0, 0, 0)


def test_the_toolstack_writes_and_removes_the_vif_directories(ts, tmp_path, kernel, engine):
    b = create(ts, tmp_path, kernel, engine, "b", MAC_B, "ip=10.0.0.2", bridge="br-test")
    assert wait_for(lambda: "connected" in b.console_text, 60), b.console_text
    front = f"/local/domain/{b.domid}/device/vif/0"
    back = f"/local/domain/0/backend/vif/{b.domid}/0"
    read = lambda path: xenstore.read(path).decode()
    assert (read(f"{front}/backend"), read(f"{front}/backend-id"), read(f"{front}/mac"),
            read(f"{front}/handle")) == (back, "0", MAC_B, "0")
    assert (read(f"{back}/frontend"), read(f"{back}/frontend-id"), read(f"{back}/bridge"),
            read(f"{back}/mac"), read(f"{back}/online"), read(f"{back}/feature-rx-copy"),
            read(f"{back}/state")) == (front, str(b.domid), "br-test", MAC_B, "1", "1",
                                       str(C.XenbusStateConnected))
    # what the frontend published
    assert read(f"{front}/request-rx-copy") == "1"
    assert int(read(f"{front}/event-channel")) > 0
    ts.destroy(b)
    for path in (front, back):
        with pytest.raises(xenstore.XenstoreError) as gone:
            xenstore.read(path)
        assert gone.value.error == "ENOENT"
    assert lib.hv_netback_stats(b.domid, 0, ffi.new("struct hv_netback_stats *")) \
        == -C.XEN_ENOENT


def test_a_domain_destroyed_mid_traffic_leaves_the_others_port_working(ts, tmp_path, kernel,
                                                                       engine):
    b = create(ts, tmp_path, kernel, engine, "b", MAC_B, "ip=10.0.0.2")
    assert wait_for(lambda: "connected" in b.console_text, 60), b.console_text
    a = create(ts, tmp_path, kernel, engine, "a", MAC_A, "ip=10.0.0.1 peer=10.0.0.2 pings=100000")
    assert wait_for(lambda: "icmp_seq=5, replied" in b.console_text, 120), b.console_text
    ts.destroy(a)                       # while it pings
    c = create(ts, tmp_path, kernel, engine, "c", MAC_C, "ip=10.0.0.3 peer=10.0.0.2 pings=2")
    assert wait_for(lambda: c.gone, 120), c.console_text
    assert netfront_part(c) == head(c.domid, "c", MAC_C, "10.0.0.3") + pinger_lines(2)
    assert wait_for(lambda: "from 10.0.0.3 icmp_seq=2, replied" in b.console_text)
    s = stats(b.domid)
    assert (s.state, s.tx_errors, s.bad_grants, s.ring_broken) == (C.XenbusStateConnected,
                                                                   0, 0, 0)


def test_cards_on_different_bridges_do_not_see_each_other(ts, tmp_path, kernel, engine):
    b = create(ts, tmp_path, kernel, engine, "b", MAC_B, "ip=10.0.0.2", bridge="left")
    assert wait_for(lambda: "connected" in b.console_text, 60), b.console_text
    a = create(ts, tmp_path, kernel, engine, "a", MAC_A,
               "ip=10.0.0.1 peer=10.0.0.2 pings=1 wait_ms=500", bridge="right")
    assert wait_for(lambda: a.gone, 60), a.console_text
    assert netfront_part(a) == (head(a.domid, "a", MAC_A, "10.0.0.1")
                                + "netfront: arp who-has 10.0.0.2\nnetfront: no arp reply\n"
                                "netfront: 0 sent, 0 received\n")
    assert stats(b.domid).rx_frames == 0


def test_the_backend_refuses_bad_tx_requests_and_a_broken_ring(ts, tmp_path, kernel, engine):
    """Requests a frontend may send but a backend must refuse: each answered
    NETIF_RSP_ERROR, nothing reaches the bridge; then a producer index no frontend
    produces: the card is no longer served (Closing). The other card on the bridge
    goes on."""
    b = create(ts, tmp_path, kernel, engine, "b", MAC_B, "ip=10.0.0.2")
    assert wait_for(lambda: "connected" in b.console_text, 60), b.console_text
    bad = create(ts, tmp_path, kernel, engine, "bad", MAC_C, "ip=10.0.0.3 badtx")
    assert wait_for(lambda: bad.gone, 60), bad.console_text
    error = C.NETIF_RSP_ERROR
    assert netfront_part(bad) == head(bad.domid, "bad", MAC_C, "10.0.0.3") + (
        f"netfront: refused: an ungranted page {error} past the page {error} a runt {error} "
        f"pieces larger than the frame {error}\n"
        f"netfront: tx req_prod 1000 ahead: backend state {C.XenbusStateClosing}\n"
        "netfront: 0 sent, 0 received\n")
    assert stats(b.domid).rx_frames == 0
    a = create(ts, tmp_path, kernel, engine, "a", MAC_A, "ip=10.0.0.1 peer=10.0.0.2 pings=1")
    assert wait_for(lambda: a.gone, 120), a.console_text
    assert netfront_part(a) == head(a.domid, "a", MAC_A, "10.0.0.1") + pinger_lines(1)


def test_a_port_that_takes_nothing_keeps_a_bounded_queue(ts, tmp_path, kernel, engine):
    """A card that posts no rx pages: the bridge queues at most PORT_QUEUE (128) frames
    for it and drops the rest, counted; the sender is not held up."""
    deaf = create(ts, tmp_path, kernel, engine, "deaf", MAC_B, "ip=10.0.0.2 norx")
    assert wait_for(lambda: "connected" in deaf.console_text, 60), deaf.console_text
    a = create(ts, tmp_path, kernel, engine, "a", MAC_A, "ip=10.0.0.1 peer=10.0.0.2 flood=300")
    assert wait_for(lambda: a.gone, 120), a.console_text
    assert netfront_part(a).endswith("netfront: arp who-has 10.0.0.2\n"
                                     "netfront: 300 sent, 0 received\n"), a.console_text
    s = stats(deaf.domid)
    assert (s.rx_frames, s.rx_dropped, s.tx_frames) == (0, 300 - 128, 0)
