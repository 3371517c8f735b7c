"""Adapter cache tiers: device slots (bounded in bytes) <- host-memory LRU (bounded in bytes) <- the store.

Adapters live in the engine under the key `name@version`, so a new version never overwrites the one
running requests use: both sit in slots until the old one is idle and evicted. The device tier is the
engine's own adapter table (slot, refcount, pin, bytes, in LRU order); this object decides what
enters and leaves it, and keeps the host tier. Eviction takes the least recently used device adapter
that no queued or running request uses and that is not pinned.

The engine thread owns all of it. Other threads only call `resolve` and read `residency`/`is_pinned`,
which answer from an immutable snapshot the engine thread replaces after every change. Disk reads run
on a loader thread, so a cold adapter never stalls the forward passes of resident ones.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch

from loraplex_adapters.manifest import Manifest, parse_reference
from loraplex_adapters.peft_folder import LoraAdapter
from loraplex_adapters.store import AdapterNotInStore, AdapterTooLarge
from loraplex_adapters.store_protocol import AdapterStoreLike
from loraplex_server.api.metrics import Metrics
from loraplex_server.engine.engine import AdapterInUse, AdapterNotFound, Engine

log = logging.getLogger(__name__)


class WrongBase(RuntimeError):
    """The adapter is registered but was trained on another base model."""


class PinRefused(RuntimeError):
    """Pinning this adapter would leave no room for the others."""


@dataclass
class HostEntry:
    adapter: LoraAdapter
    manifest: Manifest
    host_bytes: int  # as held in host memory
    device_bytes: int  # once written into device slots
    validated: bool = False  # fits this base: checked on its first slot write


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


class AdapterCache:
    def __init__(self, engine: Engine, store: AdapterStoreLike, device_bytes: int, host_bytes: int,
                 metrics: Metrics) -> None:
        self.engine, self.store, self.metrics = engine, store, metrics
        self.device_bytes, self.host_bytes = device_bytes, host_bytes
        self.host: OrderedDict[str, HostEntry] = OrderedDict()
        self._snapshot: dict[str, tuple[str, bool]] = {}  # key -> (tier, pinned), for other threads
        self.loading: dict[str, tuple[Future, float]] = {}
        self._loader = ThreadPoolExecutor(1, thread_name_prefix="loraplex-loader")
        self._element_size = torch.empty(0, dtype=engine.base.dtype).element_size()

    def close(self) -> None:
        self._loader.shutdown(wait=False, cancel_futures=True)

    # -- any thread ------------------------------------------------------------------------------

    def resolve(self, reference: str) -> tuple[str, Manifest]:
        """'name' (latest) or 'name@N' -> (key, manifest); NOT_FOUND / wrong-base errors say why. The
        store re-reads the name's folder, so another process's publish or delete shows here at once."""
        name, version = parse_reference(reference)
        try:
            manifest = self.store.lookup(name, version)  # no download: the loader thread fetches files
        except AdapterNotInStore as exc:
            raise AdapterNotFound(exc.args[0]) from None
        mismatch = self.store.base_mismatch(manifest)
        if mismatch:
            raise WrongBase(f"adapter {manifest.name}@{manifest.version}: {mismatch}")
        return adapter_key(manifest.name, manifest.version), manifest

    def residency(self, key: str) -> str:
        return self._snapshot.get(key, ("disk", False))[0]

    def is_pinned(self, key: str) -> bool:
        return self._snapshot.get(key, ("disk", False))[1]

    # -- engine thread ---------------------------------------------------------------------------

    @property
    def device(self):
        """The device tier: the engine's adapters, least recently used first."""
        return self.engine.adapters

    def _publish(self) -> None:
        snapshot = {key: ("host", False) for key in self.host}
        snapshot.update({key: ("device", a.pinned) for key, a in self.device.items()})
        self._snapshot = snapshot  # one assignment: readers see the old or the new dict, whole
        self.metrics.device_adapters.set(len(self.device))
        self.metrics.device_adapter_bytes.set(self.engine.adapter_bytes)

    def in_memory(self, key: str) -> bool:
        return key in self.device or key in self.host

    def fetch(self, key: str) -> Future | None:
        """Start reading `key` from disk on the loader thread; returns the future when a read was
        started now (the caller hands its completion to `arrived`), None when one is already running."""
        if key in self.loading:
            return None
        self.metrics.adapter_lookups.labels("disk").inc()
        future = self._loader.submit(self._read, key)
        self.loading[key] = (future, time.perf_counter())
        return future

    def _read(self, key: str) -> HostEntry:  # loader thread
        name, version = split_key(key)
        try:  # re-read from disk (another process may have deleted it), every byte checked against its sha256
            manifest, adapter = self.store.load(name, version)
        except AdapterNotInStore as exc:  # deleted since the request resolved it, or damaged and quarantined
            raise AdapterNotFound(exc.args[0]) from None
        adapter = self.engine.slots.prepare(adapter)
        return HostEntry(adapter, manifest, _bytes(adapter), _bytes(adapter, self._element_size))

    def arrived(self, key: str) -> BaseException | None:
        """Take a finished disk read into the host tier; returns its error, if it failed."""
        future, started = self.loading.pop(key)
        try:
            entry = future.result()
        except Exception as exc:
            return exc
        seconds = time.perf_counter() - started
        self.metrics.adapter_load_seconds.labels("disk").observe(seconds)
        log.info("adapter %s read from the store in %.0f ms (%d bytes in host memory)", key, 1000 * seconds,
                 entry.host_bytes)
        self.host[key] = entry
        self._trim_host(keep=key)
        self._publish()
        return None

    def _trim_host(self, keep: str) -> None:
        total = sum(e.host_bytes for e in self.host.values())
        for key in list(self.host):
            if total <= self.host_bytes:
                break
            if key != keep and key not in self.device:  # device adapters stay, so eviction is a warm swap
                total -= self.host.pop(key).host_bytes
        self.metrics.host_adapter_bytes.set(total)

    def ensure(self, key: str) -> bool:
        """Put an in-memory adapter into a device slot, evicting idle ones that are not pinned (queued
        or running requests hold theirs through the refcount). False when there is no room now."""
        if key in self.device:
            self.device.move_to_end(key)
            self.metrics.adapter_lookups.labels("device").inc()
            return True
        entry = self.host[key]
        if entry.device_bytes > self.device_bytes:
            raise AdapterTooLarge(f"adapter {key} needs {entry.device_bytes} bytes on the device, more than "
                                  f"the server's --adapter-memory of {self.device_bytes}")
        while self.engine.slots.free_slots == 0 or self.engine.adapter_bytes + entry.device_bytes > self.device_bytes:
            victim = next((k for k, a in self.device.items() if not a.pinned and a.in_flight == 0), None)
            if victim is None:
                return False
            self._evict(victim)
        started = time.perf_counter()
        self.engine.load_adapter(key, entry.adapter, labels=entry.manifest.labels or None,
                                 validate=not entry.validated, device_bytes=entry.device_bytes)
        entry.validated = True
        self.host.move_to_end(key)
        self.metrics.adapter_lookups.labels("host").inc()
        seconds = time.perf_counter() - started
        self.metrics.adapter_load_seconds.labels("host").observe(seconds)
        log.info("adapter %s loaded into a device slot in %.1f ms (%d on the device)", key, 1000 * seconds,
                 len(self.device))
        self._publish()
        return True

    def _evict(self, key: str) -> None:
        self.engine.unload_adapter(key)
        self.metrics.adapter_evictions.inc()
        log.info("adapter %s left the device (its slot is free)", key)
        self._publish()

    def pin(self, key: str) -> None:
        """Keep a device adapter from eviction; at least one slot and half the bytes stay unpinned."""
        adapter = self.device[key]
        if adapter.pinned:
            return
        pinned = [a for a in self.device.values() if a.pinned]
        pinned_bytes = sum(a.device_bytes for a in pinned) + adapter.device_bytes
        if len(pinned) + 2 > self.engine.slots.num_slots - 1 or pinned_bytes > self.device_bytes // 2:
            raise PinRefused(f"pinning {key} would leave too little device room for other adapters "
                             f"({len(pinned)} pinned; unpin one or raise --adapter-memory/--max-adapters)")
        adapter.pinned = True
        self._publish()

    def unload(self, key: str) -> None:
        """Drop a device adapter now (it stays in the host tier and the store)."""
        if key not in self.device:
            return
        in_flight = self.device[key].in_flight
        if in_flight:
            raise AdapterInUse(f"adapter {key} is used by {in_flight} running request(s); retry when they finish")
        self._evict(key)

    def forget(self, key: str) -> None:
        """The version was deleted from the store: drop its copies, except a slot still in use, which
        the LRU takes once idle (no new request can resolve it any more)."""
        self.host.pop(key, None)
        if key in self.device:
            self.device[key].pinned = False
            if not self.device[key].in_flight:
                self._evict(key)
        self._trim_host(keep="")
        self._publish()
