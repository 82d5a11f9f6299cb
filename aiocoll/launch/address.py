"""Which of this host's addresses a rank listens on and advertises to the others.

First match wins::

    init(host=...)      as given
    AIOCOLL_HOST        as given (an address or a name of this host)
    AIOCOLL_IFNAME      the address of the first interface that matches, NCCL_SOCKET_IFNAME's
                        grammar: "eth" (names starting so), "eth0,ib" (either), "=eth0" (exactly
                        that name), "^docker,lo" (any name except those starting so); IPv4
                        first, then a global IPv6 address
    the store's host    the address of the interface that routes to it: connect() on a UDP
                        socket (which sends nothing) and getsockname(); loopback for a store on
                        this host. When the launcher says the ranks span several hosts and the
                        route is loopback anyway (a host name that /etc/hosts maps to
                        127.0.1.1), the interface of the default route instead
    no store host       loopback, or the default route's interface when the launcher says the
                        ranks span several hosts (a file store on a shared filesystem)

Listening on one interface, not all, is what NCCL and gloo do too: nothing is exposed on
interfaces the job does not use.
"""

from __future__ import annotations

import asyncio
import fcntl
import ipaddress
import logging
import os
import socket
import struct
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

log = logging.getLogger("aiocoll")

LOOPBACK = "127.0.0.1"
_SIOCGIFADDR = 0x8915


def interface_addresses() -> dict[str, list[str]]:
    """This host's interfaces and their addresses (IPv4 first, then global IPv6), by name."""
    found: dict[str, list[str]] = {}
    for _, name in socket.if_nameindex():
        found[name] = []
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            try:
                raw = fcntl.ioctl(s.fileno(), _SIOCGIFADDR, struct.pack("256s", name.encode()[:15]))
            except OSError:  # no IPv4 address on this interface
                pass
            else:
                found[name].append(socket.inet_ntoa(raw[20:24]))
    try:
        lines = Path("/proc/net/if_inet6").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        fields = line.split()
        # address, index, prefix length, scope (0: global), flags, name
        if len(fields) == 6 and fields[3] == "00" and fields[5] in found:
            found[fields[5]].append(str(ipaddress.IPv6Address(bytes.fromhex(fields[0]))))
    return found


def _matches(spec: str, name: str) -> bool:
    if spec.startswith("^"):
        return not any(name.startswith(p.strip()) for p in spec[1:].split(",") if p.strip())
    if spec.startswith("="):
        return name in [p.strip() for p in spec[1:].split(",")]
    return any(name.startswith(p.strip()) for p in spec.split(",") if p.strip())


def address_of_interface(spec: str, interfaces: Mapping[str, list[str]] | None = None) -> str:
    """The address of the first interface matching ``spec`` (AIOCOLL_IFNAME's grammar).

    Raises:
        ValueError: no interface with an address matches; the message lists what there is.
    """
    interfaces = interface_addresses() if interfaces is None else interfaces
    for name, addresses in interfaces.items():
        if addresses and _matches(spec, name):
            return addresses[0]
    have = ", ".join(f"{n} ({' '.join(a) or 'no address'})" for n, a in interfaces.items()) or "none"
    raise ValueError(f"AIOCOLL_IFNAME={spec!r} matches no interface with an address; this host has: {have}")


def default_route_address() -> str | None:
    """The IPv4 address of the interface of the default route, or None where there is none."""
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        # Iface Destination Gateway Flags ...: destination 0 is the default route, flag 1 is up.
        if len(fields) > 3 and fields[1] == "00000000" and int(fields[3], 16) & 1:
            addresses = interface_addresses().get(fields[0], [])
            v4 = [a for a in addresses if ":" not in a]
            if v4:
                return v4[0]
    return None


def _is_loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def route_target(store: Any) -> str | None:
    """The host that a store lives on, as far as it says: a ``tcp://`` URL's host, or a Store
    object's ``route_to`` attribute (the stores of torchrun, MPI and Ray set one)."""
    if isinstance(store, str):
        parts = urlsplit(store)
        return parts.hostname if parts.scheme.lower() == "tcp" else None
    target = getattr(store, "route_to", None)
    return target if isinstance(target, str) else None


async def _route_to(host: str) -> str:
    loop = asyncio.get_running_loop()
    infos = await loop.getaddrinfo(host, 9, type=socket.SOCK_DGRAM)
    family, _, _, _, sockaddr = infos[0]
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        s.connect(sockaddr)  # UDP: picks the route and source address, sends nothing
        return str(s.getsockname()[0])


def chosen_by_user(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether AIOCOLL_HOST or AIOCOLL_IFNAME picks the address (then ``choose_host`` follows
    them, and callers with an address of their own, such as Ray's node address, step aside)."""
    return "AIOCOLL_HOST" in environ or "AIOCOLL_IFNAME" in environ


async def choose_host(route_to: str | None, *, spans_hosts: bool = False, environ: Mapping[str, str] = os.environ) -> str:
    """The address this rank listens on and advertises (see the module docstring).

    Args:
        route_to: the store's host, or None where the store has none (in-process, a file).
        spans_hosts: the launcher says the world's ranks are on more than one host.

    Raises:
        ValueError: AIOCOLL_HOST is set but empty, or AIOCOLL_IFNAME matches no interface.
    """
    host = environ.get("AIOCOLL_HOST")
    if host is not None:
        if not host.strip():
            raise ValueError("AIOCOLL_HOST is set but empty")
        return host.strip()
    spec = environ.get("AIOCOLL_IFNAME")
    if spec is not None:
        if not spec.strip():
            raise ValueError("AIOCOLL_IFNAME is set but empty")
        return address_of_interface(spec.strip())
    chosen = LOOPBACK
    if route_to is not None:
        try:
            chosen = await _route_to(route_to)
        except OSError as exc:  # no route (yet): the store's host will fail to resolve too
            log.warning("no route to the store's host %s (%s); listening on %s", route_to, exc, LOOPBACK)
    if spans_hosts and _is_loopback(chosen):
        fallback = default_route_address()
        if fallback is None:
            log.warning(
                "the ranks span several hosts, but this one has no default route: listening on %s; "
                "set AIOCOLL_IFNAME or AIOCOLL_HOST",
                chosen,
            )
        else:
            chosen = fallback
    return chosen


__all__ = [
    "address_of_interface",
    "chosen_by_user",
    "choose_host",
    "default_route_address",
    "interface_addresses",
    "route_target",
]
