"""The S3 adapter store: the folder store's layout and manifests under `s3://bucket/prefix`, shared by
every replica.

Layout: `<prefix>/adapters/<name>/<version>/{adapter_config.json, adapter_model.safetensors,
README.md?, loraplex.json}` and `<prefix>/claims/<name>/<version>`.
- A version number is claimed by a conditional PutObject of its claim (`If-None-Match: *`): of two
  publishers only one gets it, the other gets 412 and tries the next number. Claims outlive deletes,
  so a number is never reused and a cached `name@version` always means the same weights.
- Publishing uploads the files, then the manifest: the manifest is the commit. Readers ignore versions
  without one; `sweep` removes such orphans once their claim is older than `max_age` (an hour).
- Reading: a name's versions are listed when first asked for, when asked for a version not seen yet,
  and when the last listing is older than `refresh_seconds`; so another replica's publish shows at
  once and its delete within `refresh_seconds`. `resolve` downloads a version once into a local cache
  folder, checks every file's sha256 against the manifest, and returns that folder. `load` hashes the
  local files again as it reads them into memory; a local copy that fails is removed and downloaded
  once more.
- A version whose manifest or files in the bucket are unreadable or fail their sha256 is quarantined:
  copied to `<prefix>/quarantine/<name>-<version>-<time>/`, then removed, manifest first. Its claim
  stays, so its number is never reused.
- Version numbers are those of the folder store (manifest.VERSION_RULE); keys with any other spelling
  are ignored, and a name whose numbers are used up refuses the next publish.
- Delete removes the manifest first (the version disappears for every reader at once), then the files.

boto3 is configured the usual AWS way (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_REGION, profiles...);
it is imported here only, so a server on a folder store never imports it.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from .manifest import MANIFEST_FILE, MANIFEST_MAX_BYTES, Manifest, check_name, parse_version
from .peft_folder import AdapterFormatError, LoraAdapter
from .store_rules import (
    ALLOWED_FILES,
    AdapterNotInStore,
    StoreRules,
    check_committed,
    check_identity,
    manifest_bytes,
    manifest_from_bytes,
    next_version,
)

log = logging.getLogger(__name__)
DEFAULT_REFRESH_SECONDS = 5.0
ORPHAN_AGE_SECONDS = 3600.0
_MAX_CLAIM_TRIES = 1000


class StoreUnavailable(RuntimeError):
    """The bucket cannot be reached or used; the message says what to check."""


class _LocalCopyDamaged(AdapterNotInStore):
    """The downloaded copy failed its read (the bucket's may be fine): it was removed."""


@dataclass(frozen=True)
class S3Location:
    bucket: str
    prefix: str  # "" or "a/b/" (always ends with "/")

    @classmethod
    def parse(cls, uri: str) -> S3Location:
        """'s3://bucket/prefix' -> S3Location; raises ValueError for anything else."""
        if not uri.startswith("s3://"):
            raise ValueError(f"not an S3 location: {uri!r} (expected s3://bucket/prefix)")
        bucket, _, prefix = uri.removeprefix("s3://").partition("/")
        if not bucket:
            raise ValueError(f"no bucket in {uri!r} (expected s3://bucket/prefix)")
        prefix = prefix.strip("/")
        return cls(bucket, prefix + "/" if prefix else "")


class _Listing:
    """One name's committed versions as last listed: replaced whole, never mutated."""

    def __init__(self, versions: dict[int, Manifest]) -> None:
        self.versions, self.at = versions, time.monotonic()


class S3AdapterStore(StoreRules):
    def __init__(self, uri: str, endpoint_url: str | None = None, cache_dir: str | Path | None = None,
                 refresh_seconds: float = DEFAULT_REFRESH_SECONDS, client: Any = None, sweep: bool = True,
                 **rules: Any) -> None:
        """`rules` are StoreRules' (base_fingerprint, max_rank, max_bytes, allow_base_mismatch, check_fits);
        endpoint_url overrides the environment's (tests); cache_dir holds downloaded versions (default:
        a temporary folder removed at close)."""
        super().__init__(**rules)
        self.location = S3Location.parse(uri)
        self.refresh_seconds = refresh_seconds
        self.client = client or _client(endpoint_url)
        self._check_bucket()
        self.local = Path(cache_dir) if cache_dir else Path(tempfile.mkdtemp(prefix="loraplex-s3-"))
        self.staging = self.local / ".staging"  # uploads are received and checked here
        self.staging.mkdir(parents=True, exist_ok=True)
        self._close = weakref.finalize(self, shutil.rmtree, self.local if not cache_dir else self.staging, True)
        self._index: dict[str, _Listing] = {}
        self._listed_all = 0.0
        self._download_lock = threading.Lock()
        if sweep:
            self.sweep()

    def close(self) -> None:
        self._close()

    # -- keys -----------------------------------------------------------------------------------

    def _key(self, *parts: object) -> str:
        return self.location.prefix + "/".join(str(p) for p in parts)

    def _objects(self, prefix: str) -> list[dict]:
        """Every object under a key prefix (Key, Size, LastModified), all pages."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.location.bucket, Prefix=prefix)
        return _s3(lambda: [obj for page in pages for obj in page.get("Contents", [])])

    # -- reading --------------------------------------------------------------------------------

    def refresh(self, name: str | None = None) -> None:
        """Re-list one name's versions (or every name's) now."""
        if name is not None:
            self._list_name(name)
            return
        by_name: dict[str, set[int]] = {}
        for obj in self._objects(self._key("adapters", "")):
            parsed = self._parse_key(obj["Key"])
            if parsed and parsed[2] == MANIFEST_FILE:
                by_name.setdefault(parsed[0], set()).add(parsed[1])
        for each in sorted(set(by_name) | set(self._index)):
            self._install(each, by_name.get(each, set()))
        self._listed_all = time.monotonic()

    def _parse_key(self, key: str) -> tuple[str, int, str] | None:
        """'<prefix>adapters/<name>/<version>/<file>' -> (name, version, file); None for anything else."""
        parts = key.removeprefix(self._key("adapters", "")).split("/")
        version = parse_version(parts[1]) if len(parts) == 3 else None
        if version is None:
            return None
        try:
            return check_name(parts[0]), version, parts[2]
        except AdapterFormatError:
            return None

    def _list_name(self, name: str) -> dict[int, Manifest]:
        committed = set()
        for obj in self._objects(self._key("adapters", name, "")):
            parsed = self._parse_key(obj["Key"])
            if parsed and parsed[0] == name and parsed[2] == MANIFEST_FILE:
                committed.add(parsed[1])
        return self._install(name, committed)

    def _install(self, name: str, committed: set[int]) -> dict[int, Manifest]:
        known = self._index[name].versions if name in self._index else {}
        versions = {}
        for version in sorted(committed):
            manifest = known.get(version) or self._read_manifest(name, version)
            if manifest is not None:
                versions[version] = manifest
        for gone in set(known) - set(versions):  # deleted elsewhere: its local copy goes too
            shutil.rmtree(self.local / name / str(gone), ignore_errors=True)
        index = dict(self._index)
        index[name] = _Listing(versions)
        self._index = index  # one assignment: readers see the old or the new dict, whole
        return versions

    def _read_manifest(self, name: str, version: int) -> Manifest | None:
        """A committed version's manifest, None when it vanished meanwhile or cannot be read (logged)."""
        try:
            body = _s3(lambda: self.client.get_object(
                Bucket=self.location.bucket, Key=self._key("adapters", name, version, MANIFEST_FILE),
                Range=f"bytes=0-{MANIFEST_MAX_BYTES}")["Body"].read())
            manifest = manifest_from_bytes(body)
            check_identity(manifest, name, version)
            return manifest
        except _NoSuchKey:
            return None
        except (AdapterFormatError, ValueError, TypeError, RecursionError) as exc:
            self._quarantine(name, version, f"its manifest: {exc}")
            return None

    def _versions(self, name: str, version: int | None = None) -> dict[int, Manifest]:
        """The name's versions, re-listed when stale, when it has none, or lacks the version asked for
        (a miss): another replica's publish shows at once, its delete within refresh_seconds."""
        listing = self._index.get(name)
        if (listing is None or not listing.versions or time.monotonic() - listing.at > self.refresh_seconds
                or (version is not None and version not in listing.versions)):
            return self._list_name(name)
        return listing.versions

    def known(self, name: str) -> bool:
        """Whether `name` had versions at its last listing (no S3 call: for labelling a request whose
        lookup has just listed the name)."""
        listing = self._index.get(name)
        return bool(listing and listing.versions)

    def has(self, name: str) -> bool:
        try:
            check_name(name)
        except AdapterFormatError:
            return False
        return bool(self._versions(name))

    def list(self) -> list[Manifest]:
        if time.monotonic() - self._listed_all > self.refresh_seconds:
            self.refresh()
        index = self._index
        return [m for name in sorted(index) for _, m in sorted(index[name].versions.items())]

    def lookup(self, name: str, version: int | None = None) -> Manifest:
        """The manifest of `name@version` (latest when None), without downloading its files."""
        check_name(name)
        versions = self._versions(name, version)
        if not versions:
            raise AdapterNotInStore(f"adapter {name!r} is not registered")
        if version is None:
            version = max(versions)
        if version not in versions:
            raise AdapterNotInStore(f"adapter {name!r} has no version {version}")
        return versions[version]

    def resolve(self, name: str, version: int | None = None) -> tuple[Manifest, Path]:
        """The manifest and a local folder holding `name@version`'s files (downloaded once, checked)."""
        manifest = self.lookup(name, version)
        folder = self.local / name / str(manifest.version)
        if not folder.is_dir():
            with self._download_lock:  # one download of a version, however many threads ask
                if not folder.is_dir():
                    self._download(manifest, folder)
        return manifest, folder

    def _download(self, manifest: Manifest, folder: Path) -> None:
        name, version = manifest.name, manifest.version
        work = Path(tempfile.mkdtemp(prefix="download-", dir=self.staging))
        try:
            objects = self._objects(self._key("adapters", name, version, ""))
            files = {obj["Key"].rsplit("/", 1)[-1]: obj for obj in objects}
            if MANIFEST_FILE not in files:
                raise AdapterNotInStore(f"adapter {name}@{version} was deleted")
            unexpected = set(files) - ALLOWED_FILES - {MANIFEST_FILE}
            size = sum(obj["Size"] for obj in files.values())
            if unexpected or size > self.max_bytes + MANIFEST_MAX_BYTES:
                raise AdapterFormatError(f"adapter {name}@{version} in the S3 store holds unexpected or "
                                         "oversized files; publish it again")
            for file_name, obj in files.items():
                self._get_file(obj["Key"], work / file_name)
            try:
                check_committed(work, name, version)
            except AdapterFormatError as exc:  # the bucket's bytes differ from what was published
                self._quarantine(name, version, str(exc))
                raise self._quarantined(manifest, str(exc)) from None
            folder.parent.mkdir(parents=True, exist_ok=True)
            work.rename(folder)
        except _NoSuchKey:
            raise AdapterNotInStore(f"adapter {name}@{version} was deleted") from None
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def load(self, name: str, version: int | None = None) -> tuple[Manifest, LoraAdapter]:
        """As StoreRules.load; a local copy that fails its read is downloaded (and checked) once more."""
        try:
            return super().load(name, version)
        except _LocalCopyDamaged:
            return super().load(name, version)

    def _damaged(self, manifest: Manifest, folder: Path, reason: str) -> AdapterNotInStore:
        """The local copy failed (changed on this machine's disk): remove it; the next read downloads."""
        log.warning("the local copy of adapter %s@%s failed its read and is removed: %s", manifest.name,
                    manifest.version, reason)
        if folder.is_symlink() or not folder.is_dir():
            folder.unlink(missing_ok=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)
        return _LocalCopyDamaged(f"adapter {manifest.name}@{manifest.version}: the local copy failed its read "
                                 f"({reason}); retry")

    def _quarantine(self, name: str, version: int, reason: str) -> None:
        """Move a damaged version's objects under `quarantine/`, removing the manifest (the commit) first
        after its copy, so every replica stops serving it at once."""
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now % 1 * 1e6):06d}Z"
        target = self._key("quarantine", f"{name}-{version}-{stamp}", "")
        objects = self._objects(self._key("adapters", name, version, ""))
        for obj in objects:
            _s3(lambda obj=obj: self.client.copy_object(
                Bucket=self.location.bucket, Key=target + obj["Key"].rsplit("/", 1)[-1],
                CopySource={"Bucket": self.location.bucket, "Key": obj["Key"]}))
        manifest_key = self._key("adapters", name, version, MANIFEST_FILE)
        _s3(lambda: self.client.delete_object(Bucket=self.location.bucket, Key=manifest_key))
        self._delete_objects([o["Key"] for o in objects if o["Key"] != manifest_key])
        log.warning("adapter %s@%s in the S3 store quarantined to %s: %s", name, version, target, reason)
        listing = self._index.get(name)
        if listing is not None and version in listing.versions:
            index = dict(self._index)
            index[name] = _Listing({v: m for v, m in listing.versions.items() if v != version})
            self._index = index

    # -- writing --------------------------------------------------------------------------------

    def publish(self, source: str | Path, name: str, labels: list[str] | None = None,
                base_fingerprint: str | None = None, metrics: dict | None = None) -> Manifest:
        """Validate a PEFT folder (or .tar/.tar.gz of one) and commit it as the next version of `name`."""
        with self._staged_upload(source, name, labels, base_fingerprint, metrics) as (folder, manifest):
            manifest.version = self._claim(name)
            for path in sorted(folder.iterdir()):
                self._put_file(path, self._key("adapters", name, manifest.version, path.name))
            self._before_commit(manifest)
            _s3(lambda: self.client.put_object(  # the commit
                Bucket=self.location.bucket, Key=self._key("adapters", name, manifest.version, MANIFEST_FILE),
                Body=manifest_bytes(manifest), IfNoneMatch="*"))
        self._list_name(name)
        return manifest

    def _put_file(self, path: Path, key: str) -> None:
        with open(path, "rb") as body:  # one PUT: S3 takes up to 5 GB, far past --max-upload-bytes
            _s3(lambda: self.client.put_object(Bucket=self.location.bucket, Key=key, Body=body))

    def _get_file(self, key: str, path: Path) -> None:
        def copy() -> None:
            body = self.client.get_object(Bucket=self.location.bucket, Key=key)["Body"]
            with open(path, "wb") as f:
                shutil.copyfileobj(body, f, 1 << 20)
        _s3(copy)

    def _before_commit(self, manifest: Manifest) -> None:
        """A point between the files and the manifest (tests stop a publisher here)."""

    def _claim(self, name: str) -> int:
        """The next free version number of `name`, taken with a conditional write of its claim."""
        claimed = (parse_version(obj["Key"].rsplit("/", 1)[-1]) for obj in self._objects(self._key("claims", name, "")))
        version = next_version(name, max([*filter(None, claimed), *self._versions(name), 0]))
        for _ in range(_MAX_CLAIM_TRIES):
            try:
                _s3(lambda v=version: self.client.put_object(
                    Bucket=self.location.bucket, Key=self._key("claims", name, v), Body=b"", IfNoneMatch="*"))
                return version
            except _PreconditionFailed:
                version = next_version(name, version)  # another publisher holds it
        raise StoreUnavailable(f"could not claim a version of {name!r} after {_MAX_CLAIM_TRIES} tries")

    def delete(self, name: str, version: int | None = None) -> list[int]:
        """Delete one version, or every version listed now; returns the versions removed."""
        check_name(name)
        on_store = set(self._list_name(name))
        if not on_store or (version is not None and version not in on_store):
            raise AdapterNotInStore(f"adapter {name!r}{'' if version is None else f'@{version}'} "
                                    "is not registered")
        doomed = [version] if version is not None else sorted(on_store)
        for v in doomed:  # the manifest first: the version disappears for every reader at once
            _s3(lambda v=v: self.client.delete_object(
                Bucket=self.location.bucket, Key=self._key("adapters", name, v, MANIFEST_FILE)))
        for v in doomed:
            self._delete_objects([o["Key"] for o in self._objects(self._key("adapters", name, v, ""))])
        self._list_name(name)
        return doomed

    def _delete_objects(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):  # DeleteObjects takes at most 1000 keys
            batch = [{"Key": k} for k in keys[start:start + 1000]]
            _s3(lambda b=batch: self.client.delete_objects(Bucket=self.location.bucket,
                                                           Delete={"Objects": b, "Quiet": True}))

    def sweep(self, max_age: float = ORPHAN_AGE_SECONDS) -> list[str]:
        """Remove what dead publishers left: the files of versions without a manifest whose claim is
        older than max_age seconds, and claims older than that without files, except each name's
        highest (it keeps numbers from being reused). Returns the keys removed."""
        now = datetime.now(UTC)
        claims = {}
        for obj in self._objects(self._key("claims", "")):
            name, _, number = obj["Key"].removeprefix(self._key("claims", "")).partition("/")
            if parse_version(number) is not None:
                claims[(name, int(number))] = obj
        stored: dict[tuple[str, int], list[dict]] = {}
        for obj in self._objects(self._key("adapters", "")):
            parsed = self._parse_key(obj["Key"])
            if parsed:
                stored.setdefault(parsed[:2], []).append(obj)

        def old(obj: dict | None) -> bool:
            return obj is None or (now - obj["LastModified"]).total_seconds() >= max_age

        doomed = []
        for version, objects in stored.items():
            committed = any(o["Key"].endswith("/" + MANIFEST_FILE) for o in objects)
            if not committed and old(claims.get(version)) and all(old(o) for o in objects):
                doomed += [o["Key"] for o in objects]
        highest: dict[str, int] = {}
        for name, number in claims:
            highest[name] = max(highest.get(name, 0), number)
        doomed += [obj["Key"] for (name, number), obj in claims.items()
                   if (name, number) not in stored and number < highest[name] and old(obj)]
        self._delete_objects(doomed)
        if doomed:
            log.info("swept %d orphaned object(s) from the S3 store", len(doomed))
        return doomed

    def _check_bucket(self) -> None:
        try:
            _s3(lambda: self.client.head_bucket(Bucket=self.location.bucket))
        except (StoreUnavailable, _NoSuchKey) as exc:
            raise StoreUnavailable(f"cannot use the S3 bucket {self.location.bucket!r}: {exc}; check the bucket "
                                   "name, AWS_ENDPOINT_URL, credentials and region") from None


class _NoSuchKey(Exception):
    pass


class _PreconditionFailed(Exception):
    pass


def _client(endpoint_url: str | None) -> Any:
    import boto3  # here: only an S3 store needs it
    from botocore.config import Config

    return boto3.client("s3", endpoint_url=endpoint_url,
                        config=Config(retries={"mode": "standard", "max_attempts": 5}))


def _s3(call):
    """Run one S3 call; its failures become _NoSuchKey, _PreconditionFailed or StoreUnavailable."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        return call()
    except ClientError as exc:
        error = exc.response.get("Error", {})
        code, status = str(error.get("Code", "")), exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("NoSuchKey", "404", "NotFound") or status == 404:
            raise _NoSuchKey(code) from None
        if code == "PreconditionFailed" or status == 412:
            raise _PreconditionFailed(code) from None
        raise StoreUnavailable(f"S3 answered {code or status}: {error.get('Message', '')}".strip()) from None
    except BotoCoreError as exc:
        raise StoreUnavailable(f"S3 cannot be reached ({exc})") from None
