"""The address a rank listens on and advertises: the interface that routes to the store's host,
AIOCOLL_IFNAME and AIOCOLL_HOST over it, loopback only for a store on this host."""

from __future__ import annotations

import asyncio
import json
import socket

import numpy as np
import pytest

import aiocoll
from aiocoll.core.world import current_world, in_harness
from aiocoll.launch.address import (
    address_of_interface,
    choose_host,
    default_route_address,
    interface_addresses,
    route_target,
)

FAKE = {"lo": ["127.0.0.1"], "docker0": ["172.17.0.1"], "eth0": ["10.1.2.3", "fd00::3"], "ib0": ["10.9.9.9"],
        "eth1": []}


def _non_loopback_address() -> str | None:
    for name, addresses in interface_addresses().items():
        for a in addresses:
            if ":" not in a and not a.startswith("127."):
                return a
    return None


@pytest.mark.parametrize(
    ("spec", "address"),
    [
        ("eth", "10.1.2.3"),  # a prefix: eth1 has no address, eth0 has
        ("ib,eth", "10.1.2.3"),  # either prefix: the first interface in the host's order
        ("=ib0", "10.9.9.9"),
        ("^lo,docker", "10.1.2.3"),
        ("^lo,docker,eth", "10.9.9.9"),
    ],
)
def test_aiocoll_ifname_reads_like_nccl_socket_ifname(spec: str, address: str) -> None:
    assert address_of_interface(spec, FAKE) == address


def test_an_ifname_matching_nothing_lists_what_there_is() -> None:
    with pytest.raises(ValueError) as info:
        address_of_interface("=eth", FAKE)
    assert "AIOCOLL_IFNAME='=eth'" in str(info.value) and "eth0 (10.1.2.3 fd00::3)" in str(info.value)


async def test_aiocoll_host_then_aiocoll_ifname_override_the_route() -> None:
    assert await choose_host("127.0.0.1", environ={"AIOCOLL_HOST": "10.7.7.7", "AIOCOLL_IFNAME": "lo"}) == "10.7.7.7"
    assert await choose_host("192.0.2.1", environ={"AIOCOLL_IFNAME": "=lo"}) == "127.0.0.1"
    for name in ("AIOCOLL_HOST", "AIOCOLL_IFNAME"):
        with pytest.raises(ValueError, match=name):
            await choose_host(None, environ={name: " "})


async def test_a_store_on_this_host_keeps_loopback() -> None:
    assert await choose_host("127.0.0.1", environ={}) == "127.0.0.1"
    assert await choose_host("localhost", environ={}) == "127.0.0.1"
    assert await choose_host(None, environ={}) == "127.0.0.1"


async def test_the_route_to_the_store_picks_the_interface() -> None:
    mine = _non_loopback_address()
    if mine is None:
        pytest.skip("this host has no non-loopback IPv4 address (the netns tests cover routing)")
    assert await choose_host(mine, environ={}) == mine


async def test_ranks_spread_over_hosts_never_advertise_loopback() -> None:
    route = default_route_address()
    if route is None:
        pytest.skip("this host has no default route")
    # A node name that /etc/hosts maps to 127.0.1.1 routes to loopback; the others cannot reach that.
    assert await choose_host("127.0.1.1", spans_hosts=True, environ={}) == route


def test_route_target_of_each_kind_of_store() -> None:
    assert route_target("tcp://10.0.0.5:29500") == "10.0.0.5"
    assert route_target("tcp://[fd00::1]:29500") == "fd00::1"
    assert route_target("file:///shared/x") is None
    assert route_target(None) is None

    class Launched:
        route_to = "head"

    assert route_target(Launched()) == "head"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_init_advertises_the_address_that_routes_to_the_store_not_loopback(monkeypatch) -> None:
    mine = _non_loopback_address()
    if mine is None:
        pytest.skip("this host has no non-loopback IPv4 address (the netns tests cover routing)")
    monkeypatch.delenv("AIOCOLL_HOST", raising=False)
    monkeypatch.delenv("AIOCOLL_IFNAME", raising=False)
    url = f"tcp://{mine}:{_free_port()}"
    rng = np.random.default_rng()
    data = [rng.standard_normal(33) for _ in range(2)]

    async def rank(r: int) -> tuple[str, np.ndarray]:
        in_harness.set(True)
        async with aiocoll.init(rank=r, world_size=2, store=url, transport="tcp", secret="s", timeout=30):
            w = current_world()
            published = json.loads(await w.store.get(f"aiocoll/{1}/addr/{r}", timeout=5))
            return published["addresses"]["tcp"], await aiocoll.all_reduce(data[r])

    results = await asyncio.wait_for(asyncio.gather(rank(0), rank(1)), 60)
    for advertised, total in results:
        assert advertised.startswith(f"tcp://{mine}:"), advertised
        np.testing.assert_allclose(total, data[0] + data[1])
