"""The adapter store interface the server uses, and `open_store` picking its backend from a location:
a folder path (the folder store) or `s3://bucket/prefix` (the S3 store; only then is boto3 imported)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from .manifest import Manifest
from .peft_folder import LoraAdapter


class AdapterStoreLike(Protocol):
    staging: Path  # a local folder uploads are received into before publish

    def has(self, name: str) -> bool: ...
    def known(self, name: str) -> bool: ...
    def list(self) -> list[Manifest]: ...
    def lookup(self, name: str, version: int | None = None) -> Manifest: ...
    def resolve(self, name: str, version: int | None = None) -> tuple[Manifest, Path]: ...
    def load(self, name: str, version: int | None = None) -> tuple[Manifest, LoraAdapter]: ...
    def publish(self, source: str | Path, name: str, labels: list[str] | None = None,
                base_fingerprint: str | None = None, metrics: dict | None = None) -> Manifest: ...
    def delete(self, name: str, version: int | None = None) -> list[int]: ...
    def refresh(self, name: str | None = None) -> None: ...
    def base_mismatch(self, manifest: Manifest) -> str | None: ...
    def close(self) -> None: ...


def is_s3(location: str) -> bool:
    return str(location).startswith("s3://")


def open_store(location: str | Path, **rules: Any) -> AdapterStoreLike:
    """The store at `location`; `rules` are StoreRules' (base_fingerprint, max_rank, max_bytes,
    allow_base_mismatch, check_fits)."""
    if is_s3(str(location)):
        from .s3_store import S3AdapterStore  # imports boto3

        return S3AdapterStore(str(location), **rules)
    from .store import AdapterStore

    return AdapterStore(location, **rules)
