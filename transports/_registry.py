"""Transport registry: names to factories, fed by the entry-point group ``aiocoll.transports``.

Built-in transports register through the same entry points as plugins (see pyproject.toml), so
there is one way in. A name that fails to import stays listed with the reason, so that
``python -m aiocoll.transports`` can say why ``ucx`` is unavailable instead of pretending it
does not exist.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from importlib.metadata import entry_points

from ._base import TransportFactory

ENTRY_POINT_GROUP = "aiocoll.transports"

# Built-ins, used when the package metadata is missing (e.g. running from a source tree that was
# never installed). Installed, the entry points say the same thing.
_BUILTIN = {
    "inproc": "aiocoll.transports.inproc:InprocTransport",
    "tcp": "aiocoll.transports.tcp:TcpTransport",
    "shm": "aiocoll.transports.shm:ShmTransport",
    "ucx": "aiocoll.transports.ucx:UcxTransport",
}

_registered: dict[str, TransportFactory] = {}


@dataclass(frozen=True)
class TransportInfo:
    """One row of ``available_transports()``: ``error`` says why a transport cannot load."""

    name: str
    target: str
    available: bool
    error: str = ""


def register_transport(name: str, factory: TransportFactory) -> None:
    """Register ``factory`` under ``name`` at run time (tests, notebooks). Plugins use entry points."""
    if not name or not name.isidentifier():
        raise ValueError(f"transport name must be an identifier, got {name!r}")
    _registered[name] = factory


def _targets() -> dict[str, str]:
    targets = dict(_BUILTIN)
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        targets[ep.name] = ep.value
    return targets


def _load(target: str) -> TransportFactory:
    module, _, attr = target.partition(":")
    obj: object = importlib.import_module(module)
    for part in attr.split(".") if attr else ():
        obj = getattr(obj, part)
    return obj  # type: ignore[return-value]


def get_transport(name: str) -> TransportFactory:
    """Return the factory registered as ``name``.

    Raises:
        ValueError: no transport has that name; the message lists the known ones.
        ImportError: the transport exists but its dependencies are missing; the message says
            what to install.
    """
    if name in _registered:
        return _registered[name]
    targets = _targets()
    if name not in targets:
        known = sorted(set(targets) | set(_registered))
        raise ValueError(f"unknown transport {name!r}; known transports: {', '.join(known)}")
    return _load(targets[name])


def available_transports() -> list[TransportInfo]:
    """Every transport found (built in, entry points, registered), with whether it loads."""
    rows = []
    for name, target in sorted(_targets().items()):
        try:
            _load(target)
        except Exception as exc:  # an optional dependency missing is information, not failure
            rows.append(TransportInfo(name, target, False, f"{type(exc).__name__}: {exc}"))
        else:
            rows.append(TransportInfo(name, target, True))
    for name, factory in sorted(_registered.items()):
        rows.append(TransportInfo(name, repr(factory), True))
    return rows
