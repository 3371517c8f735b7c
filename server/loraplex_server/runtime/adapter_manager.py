"""The adapter manager: the one owner of adapter residency, on the engine's thread.

One record per adapter version (`name@version`), in one of four states:

    disk --request--> loading --read done--> host --placed--> device
      ^                  |                    ^ |                 |
      +---- read failed -+    host LRU trim --+ +<-- evicted -----+

A device adapter keeps its host copy (so an eviction is a warm swap back later). Each record also
counts its in-flight requests (queued or running in the engine) and whether it is pinned, and holds the
requests waiting for it to reach a slot. The device tier is bounded by a byte budget and the slot
table's slots; the host tier by a byte budget, least recently used out first. Eviction takes the least
recently used device adapter that is neither pinned nor in use, so replacing or deleting an adapter
never tears a request running on it: a new version is a new record, and a deleted one leaves its slot
once idle.

The engine thread calls everything except `resolve`, `residency`, `is_pinned` and `snapshot`, which
other threads (the event loop, metrics, Ray's router) may call: they read an immutable snapshot the
engine thread replaces after every change. Disk reads run on a loader thread, so a cold adapter never
stalls the forward passes of resident ones.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType

import torch

from loraplex_adapters.manifest import Manifest, parse_reference
from loraplex_adapters.peft_folder import LoraAdapter
from loraplex_adapters.store import AdapterNotInStore, AdapterTooLarge
from loraplex_adapters.store_protocol import AdapterStoreLike
from loraplex_server.api.metrics import Metrics
from loraplex_server.engine.engine import Engine
from loraplex_server.engine.requests import AdapterInUse, AdapterNotFound, SlotAdapter, adapter_labels

log = logging.getLogger(__name__)


class WrongBase(RuntimeError):
    """The adapter is registered but was trained on another base model."""


class PinRefused(RuntimeError):
    """Pinning this adapter would leave no room for the others."""


class Tier(StrEnum):
    DISK = "disk"
    LOADING = "loading"
    HOST = "host"
    DEVICE = "device"


def adapter_key(name: str, version: int) -> str:
    return f"{name}@{version}"


def split_key(key: str) -> tuple[str, int]:
    name, version = key.rsplit("@", 1)
    return name, int(version)


def _bytes(adapter: LoraAdapter, element_size: int | None = None) -> int:
    tensors = [t for m in adapter.modules.values() for t in (m.A, m.B)]
    if adapter.head is not None:
        tensors += [t for t in (adapter.head.weight, adapter.head.bias) if t is not None]
    return sum(t.numel() * (element_size or t.element_size()) for t in tensors)


@dataclass
class _HostCopy:
    """What a disk read produces: the weights as a slot write wants them, and their sizes."""

    weights: LoraAdapter
    manifest: Manifest
    labels: tuple[str, ...]
    host_bytes: int  # as held in host memory
    device_bytes: int  # once written into device slots


@dataclass
class AdapterVersion:
    """Everything about one adapter version's residency, in one place."""

    key: str
    tier: Tier = Tier.DISK
    copy: _HostCopy | None = None  # in host memory (the host and device tiers)
    placed: SlotAdapter | None = None  # in a device slot (the device tier)
    validated: bool = False  # fits this base: checked on its first slot write
    pinned: bool = False
    in_flight: int = 0  # requests queued or running in the engine on it
    deleted: bool = False  # gone from the store: it leaves the device once idle
    last_used: int = 0  # LRU clock
    load: Future | None = None  # the disk read under way (loading)
    load_started: float = 0.0
    waiting: list[tuple[int, object]] = field(default_factory=list)  # (ticket, request) waiting for a slot


@dataclass(frozen=True)
class Residency:
    """What other threads may read about a version: a value in the manager's published snapshot."""

    tier: str  # "disk" (also while loading), "host" or "device"
    pinned: bool = False
    in_flight: int = 0


Placed = tuple[object, SlotAdapter | BaseException]  # a waiting request and its slot, or why it cannot run


class AdapterManager:
    def __init__(self, engine: Engine, store: AdapterStoreLike, device_bytes: int, host_bytes: int,
                 metrics: Metrics) -> None:
        self.engine, self.store, self.metrics = engine, store, metrics
        self.device_bytes, self.host_bytes = device_bytes, host_bytes
        self.versions: dict[str, AdapterVersion] = {}
        self._busy: dict[str, AdapterVersion] = {}  # versions being read or with requests waiting
        self.wake: Callable[[], None] = lambda: None  # called from the loader thread when a read ends
        self._snapshot: Mapping[str, Residency] = MappingProxyType({})
        self._clock = itertools.count(1)
        self._tickets = itertools.count(1)
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="loraplex-loader")
        self._element_size = torch.empty(0, dtype=engine.base.dtype).element_size()

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    # -- any thread ------------------------------------------------------------------------------

    def resolve(self, reference: str) -> tuple[str, Manifest]:
        """'name' (latest) or 'name@N' -> (key, manifest); NOT_FOUND / wrong-base errors say why. The
        store re-reads the name's folder (blocking I/O: call it off the event loop), so another
        process's publish or delete shows here at once."""
        name, version = parse_reference(reference)
        try:
            manifest = self.store.lookup(name, version)  # no download: the loader thread fetches files
        except AdapterNotInStore as exc:
            raise AdapterNotFound(exc.args[0]) from None
        mismatch = self.store.base_mismatch(manifest)
        if mismatch:
            raise WrongBase(f"adapter {manifest.name}@{manifest.version}: {mismatch}")
        return adapter_key(manifest.name, manifest.version), manifest

    def snapshot(self) -> Mapping[str, Residency]:
        """Every version in memory (or on its way), as of the engine thread's last change."""
        return self._snapshot

    def residency(self, key: str) -> str:
        return self._snapshot.get(key, Residency("disk")).tier

    def is_pinned(self, key: str) -> bool:
        return self._snapshot.get(key, Residency("disk")).pinned

    # -- engine thread: requests -----------------------------------------------------------------

    def request(self, key: str, waiter: object) -> None:
        """`waiter` (a request) needs `key` in a slot: it waits here until `placed()` hands it out."""
        version = self.versions.get(key) or self.versions.setdefault(key, AdapterVersion(key))
        version.waiting.append((next(self._tickets), waiter))
        self._busy[key] = version
        if version.tier is Tier.DISK:
            self._read(version)

    def withdraw(self, match: Callable[[object], bool]) -> list[object]:
        """Take the waiting requests that `match` out (cancelled before they reached the engine)."""
        gone = []
        for version in self._busy.values():
            gone += [w for _, w in version.waiting if match(w)]
            version.waiting = [(t, w) for t, w in version.waiting if not match(w)]
        return gone

    def placed(self) -> list[Placed]:
        """Take in finished disk reads, then put waiting requests' adapters into slots, oldest request
        first, as room allows; returns each request that can run now with its slot (counted in flight
        until `release`), or with the error that ends it. The others keep waiting (for their read, or
        for device room that running requests hold)."""
        out: list[Placed] = []
        busy = list(self._busy.values())
        arrived = [v for v in busy if v.tier is Tier.LOADING and v.load.done()]
        for version in arrived:
            error = self._arrived(version)
            if error is not None:
                out += [(w, error) for _, w in version.waiting]
                version.waiting.clear()
                self._drop_if_unused(version)
        for version in [v for v in busy if v.waiting and v.tier is Tier.DISK]:
            self._read(version)  # its copy was dropped (deleted, trimmed) while requests waited
        for version in sorted((v for v in busy if v.waiting and v.copy is not None), key=lambda v: v.waiting[0][0]):
            hit = version.tier is Tier.DEVICE
            try:
                if not self._place(version):
                    continue
            except Exception as exc:  # noqa: BLE001 - too large, does not fit the base: its requests fail
                out += [(w, exc) for _, w in version.waiting]
                version.waiting.clear()
                continue
            if hit:
                self.metrics.adapter_lookups.labels("device").inc(len(version.waiting))
            version.in_flight += len(version.waiting)
            out += [(w, version.placed) for _, w in version.waiting]
            version.waiting.clear()
        for version in busy:
            if not version.waiting and version.tier is not Tier.LOADING:
                self._busy.pop(version.key, None)
        if out or arrived:
            self._publish()
        return out

    def release(self, key: str) -> None:
        """A request placed by `placed()` ended (finished, failed or cancelled)."""
        version = self.versions[key]
        version.in_flight -= 1
        if version.deleted and not version.in_flight and version.tier is Tier.DEVICE:
            self._evict(version)
        self._publish()

    def place(self, key: str) -> SlotAdapter | None:
        """Put an adapter already in host memory into a slot now (tests, benchmarks); None if no room."""
        version = self.versions[key]
        return version.placed if self._place(version) else None

    # -- engine thread: tiers --------------------------------------------------------------------

    def _read(self, version: AdapterVersion) -> None:
        """Start reading a version from disk on the loader thread."""
        self.metrics.adapter_lookups.labels("disk").inc()
        version.tier, version.load, version.load_started = Tier.LOADING, self._loader.submit(
            self._read_copy, version.key), time.perf_counter()
        version.load.add_done_callback(lambda _: self.wake())
        self._publish()

    def read(self, key: str) -> Future:
        """Start reading `key` into host memory with no request waiting (tests, benchmarks, warm-up):
        once the future is done, `placed()` takes it in."""
        version = self.versions.setdefault(key, AdapterVersion(key))
        if version.tier is Tier.DISK:
            self._busy[key] = version
            self._read(version)
        return version.load

    def _read_copy(self, key: str) -> _HostCopy:  # loader thread
        name, version = split_key(key)
        try:  # re-read from disk (another process may have deleted it), every byte checked against its sha256
            manifest, adapter = self.store.load(name, version)
        except AdapterNotInStore as exc:  # deleted since the request resolved it, or damaged and quarantined
            raise AdapterNotFound(exc.args[0]) from None
        weights = self.engine.slots.prepare(adapter)
        labels = adapter_labels(weights, manifest.labels or None)
        return _HostCopy(weights, manifest, labels, _bytes(weights), _bytes(weights, self._element_size))

    def _arrived(self, version: AdapterVersion) -> BaseException | None:
        """Take a finished disk read into the host tier; returns its error, if it failed."""
        future, version.load = version.load, None
        try:
            copy = future.result()
        except Exception as exc:  # noqa: BLE001 - the requests waiting for it get the error
            version.tier = Tier.DISK
            return exc
        seconds = time.perf_counter() - version.load_started
        self.metrics.adapter_load_seconds.labels("disk").observe(seconds)
        log.info("adapter %s read from the store in %.0f ms (%d bytes in host memory)", version.key,
                 1000 * seconds, copy.host_bytes)
        version.tier, version.copy, version.last_used = Tier.HOST, copy, next(self._clock)
        if version.deleted and not version.waiting:  # deleted while it was read: nobody will use it
            version.copy, version.tier = None, Tier.DISK
            self._drop_if_unused(version)
        self._trim_host(keep=version)
        return None

    def _trim_host(self, keep: AdapterVersion | None) -> None:
        """Drop host copies, least recently used first, until the host tier fits its budget. Device
        adapters keep theirs (so an eviction is a warm swap), and so do versions with requests waiting."""
        held = [v for v in self.versions.values() if v.copy is not None]
        total = sum(v.copy.host_bytes for v in held)
        for version in sorted(held, key=lambda v: v.last_used):
            if total <= self.host_bytes:
                break
            if version is not keep and version.tier is Tier.HOST and not version.waiting:
                total -= version.copy.host_bytes
                version.copy, version.tier = None, Tier.DISK
                self._drop_if_unused(version)
        self.metrics.host_adapter_bytes.set(total)

    def _device_used(self) -> int:
        return sum(v.copy.device_bytes for v in self.versions.values() if v.tier is Tier.DEVICE)

    def _place(self, version: AdapterVersion) -> bool:
        """Put a host-tier version into a slot, evicting idle unpinned ones, least recently used first
        (queued or running requests hold theirs through in_flight). False when there is no room now."""
        version.last_used = next(self._clock)
        if version.tier is Tier.DEVICE:
            return True
        need = version.copy.device_bytes
        if need > self.device_bytes:
            raise AdapterTooLarge(f"adapter {version.key} needs {need} bytes on the device, more than the "
                                  f"server's --adapter-memory of {self.device_bytes}")
        while self.engine.slots.free_slots == 0 or self._device_used() + need > self.device_bytes:
            idle = [v for v in self.versions.values()
                    if v.tier is Tier.DEVICE and not v.pinned and not v.in_flight]
            if not idle:
                return False
            self._evict(min(idle, key=lambda v: v.last_used))
        started = time.perf_counter()
        copy = version.copy
        version.placed = self.engine.write_adapter(copy.weights, list(copy.labels), validate=not version.validated,
                                                   identity=version.key)
        version.tier, version.validated = Tier.DEVICE, True
        self.metrics.adapter_lookups.labels("host").inc()
        seconds = time.perf_counter() - started
        self.metrics.adapter_load_seconds.labels("host").observe(seconds)
        log.info("adapter %s written into device slot %d in %.1f ms", version.key, version.placed.slot,
                 1000 * seconds)
        self._publish()
        return True

    def _evict(self, version: AdapterVersion) -> None:
        self.engine.free_adapter(version.placed)
        version.placed, version.tier = None, Tier.HOST
        self.metrics.adapter_evictions.inc()
        log.info("adapter %s left the device (its slot is free)", version.key)
        if version.deleted:  # blocks its last rows computed since the delete go too
            self.engine.forget_prefixes(version.key)
            version.copy, version.tier = None, Tier.DISK
            self._drop_if_unused(version)
        self._publish()

    def _drop_if_unused(self, version: AdapterVersion) -> None:
        """A version back on disk with nobody waiting needs no record (disk is every key's default)."""
        if version.tier is Tier.DISK and not version.waiting and not version.in_flight:
            self.versions.pop(version.key, None)

    def _publish(self) -> None:
        snapshot = {key: Residency("disk" if v.tier is Tier.LOADING else str(v.tier), v.pinned, v.in_flight)
                    for key, v in self.versions.items() if v.tier is not Tier.DISK}
        self._snapshot = MappingProxyType(snapshot)  # one assignment: readers see the old or the new, whole
        device = [v for v in self.versions.values() if v.tier is Tier.DEVICE]
        self.metrics.device_adapters.set(len(device))
        self.metrics.device_adapter_bytes.set(sum(v.copy.device_bytes for v in device))

    # -- engine thread: admin --------------------------------------------------------------------

    def pin(self, key: str) -> None:
        """Keep a device adapter from eviction; at least one slot and half the bytes stay unpinned."""
        version = self.versions[key]
        if version.pinned:
            return
        pinned = [v for v in self.versions.values() if v.pinned]
        pinned_bytes = sum(v.copy.device_bytes for v in pinned) + version.copy.device_bytes
        if len(pinned) + 2 > self.engine.slots.num_slots - 1 or pinned_bytes > self.device_bytes // 2:
            raise PinRefused(f"pinning {key} would leave too little device room for other adapters "
                             f"({len(pinned)} pinned; unpin one or raise --adapter-memory/--max-adapters)")
        version.pinned = True
        self._publish()

    def unload(self, key: str) -> None:
        """Drop a device adapter now (it stays in the host tier and the store); unpins it."""
        version = self.versions.get(key)
        if version is None or version.tier is not Tier.DEVICE:
            return
        if version.in_flight:
            raise AdapterInUse(f"adapter {key} is used by {version.in_flight} running request(s); retry when "
                               "they finish")
        version.pinned = False
        self._evict(version)

    def forget(self, key: str) -> None:
        """The version was deleted from the store: drop its copies, except a slot still in use, which
        it leaves once idle (no new request can resolve it any more)."""
        self.engine.forget_prefixes(key)
        version = self.versions.get(key)
        if version is None:
            return
        version.pinned, version.deleted = False, True
        if version.tier is Tier.DEVICE and not version.in_flight:
            self._evict(version)
        elif version.tier is Tier.HOST:
            version.copy, version.tier = None, Tier.DISK
            self._drop_if_unused(version)
        self._trim_host(keep=None)
        self._publish()
