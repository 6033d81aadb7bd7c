"""The catalogue of backups: manifests, how backups are named in the storage, and
listing, finding and pruning them.

A backup is listed only once its manifest exists, and a manifest is trusted only for the
dump beside it: a damaged one is skipped (and named), never followed.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta, timezone

from dbmigrate.errors import ConfigError
from dbmigrate.storage import Storage
from dbmigrate.target import DatabaseTarget


@dataclass
class Manifest:
    id: str
    environment: str
    database: str
    key: str
    location: str
    sha256: str
    size_bytes: int
    compression: str
    pg_dump_version: str
    server_version: str
    revision: str | None
    row_counts: dict[str, int]
    duration_s: float
    created_at: str
    checks: dict = field(default_factory=dict)
    verified: bool = False
    verified_at: str | None = None
    format: str = "custom"  # custom: one streamed file; directory: pg_dump -Fd -j N

    @property
    def manifest_key(self) -> str:
        return manifest_key(self.key)

    @property
    def created(self) -> datetime:
        return datetime.fromisoformat(self.created_at)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2) + "\n"

    @classmethod
    def from_json(cls, body: str) -> Manifest:
        """Raises ValueError saying what is wrong with a damaged manifest."""
        try:
            manifest = cls(**json.loads(body))
        except TypeError as exc:  # not an object, a field missing or unknown
            raise ValueError(str(exc).removeprefix("Manifest.__init__() ")) from None
        for name, kind in _FIELD_TYPES.items():
            if not isinstance(getattr(manifest, name), kind):
                raise ValueError(f"{name} is not a {kind.__name__}")
        if manifest.created.tzinfo is None:  # compared with aware times by prune
            raise ValueError("created_at has no time zone")
        if manifest.format not in ("custom", "directory"):
            raise ValueError(f"unknown format {manifest.format!r}")
        return manifest


_FIELD_TYPES = {"id": str, "key": str, "size_bytes": int, "created_at": str, "checks": dict, "verified": bool,
                "row_counts": dict, "format": str}


def how_checked(verified: bool) -> str:
    """What a backup passed before it was taken (backup.take fails otherwise), in words."""
    return "verified by a restore" if verified else "checksum and pg_restore --list checked"


def manifest_key(dump_key: str) -> str:
    return dump_key.removesuffix(".dump").removesuffix(".dir") + ".json"


def backup_id(dump_key: str) -> str:
    return manifest_key(dump_key).rsplit("/", 1)[-1].removesuffix(".json")


def _safe(part: str) -> str:
    """A name as one storage path segment: never empty, '.' or '..' (an environment named '..')."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", part)
    return safe if safe.strip(".") else safe.replace(".", "_") or "_"


def prefix(target: DatabaseTarget) -> str:
    return f"{_safe(target.environment)}/{_safe(target.database)}/"


def backup_key(target: DatabaseTarget, revision: str | None, now: datetime, directory: bool = False) -> str:
    """``<environment>/<database>/<UTC timestamp>-<revision>.dump`` (``.dir`` for the directory format)"""
    stamp = now.astimezone(timezone.utc).strftime("%Y%m%dT%H%M%S.%f")[:-3] + "Z"  # ms: ids stay unique
    return f"{prefix(target)}{stamp}-{_safe(revision or 'base')}.{'dir' if directory else 'dump'}"


@dataclass
class Listed:
    """A backup as the storage shows it now: its manifest and the size of its dump."""

    manifest: Manifest
    stored_size: int | None  # bytes found now; None: the dump is missing

    @property
    def damage(self) -> str | None:
        if self.stored_size is None:
            return "dump missing"
        if self.stored_size != self.manifest.size_bytes:
            return (f"size differs: truncated or corrupted ({self.stored_size} bytes stored, "
                    f"{self.manifest.size_bytes} in the manifest)")
        return None

    @property
    def restorable(self) -> bool:
        checks = self.manifest.checks
        return self.damage is None and bool(self.manifest.verified or (checks.get("sha256") and
                                                                       checks.get("pg_restore_list")))

    @property
    def status(self) -> str:
        return "damaged" if self.damage else "verified" if self.manifest.verified else "checked"

    def as_dict(self) -> dict:
        return {**asdict(self.manifest), "status": self.status, "damage": self.damage,
                "stored_size_bytes": self.stored_size}


@dataclass(frozen=True)
class Skipped:
    """A manifest that cannot be trusted (unreadable, or naming another object): never followed."""

    key: str
    reason: str

    @property
    def id(self) -> str:
        return self.key.rsplit("/", 1)[-1].removesuffix(".json")

    def as_dict(self) -> dict:
        return {"id": self.id, "manifest_key": self.key, "status": "damaged",
                "damage": f"manifest unreadable: {self.reason}"}


@dataclass
class Catalogue:
    backups: list[Listed]  # newest first
    skipped: list[Skipped]

    def newest_restorable(self) -> Listed | None:
        """The newest verified backup whose dump is intact, else the newest intact one that passed its checks."""
        restorable = [b for b in self.backups if b.restorable]
        return next((b for b in restorable if b.manifest.verified), restorable[0] if restorable else None)


def catalogue(storage: Storage, target: DatabaseTarget) -> Catalogue:
    """Every backup of this environment and database, with what a cheap look at the storage
    tells now; a damaged manifest is skipped (and named) rather than hiding the others."""
    sizes = storage.sizes(prefix(target))
    backups, skipped = [], []
    for key in sorted(k for k in sizes if k.endswith(".json")):
        try:
            manifest = _read_manifest(storage, key)
        except (ValueError, ConfigError) as exc:  # truncated, hostile, or a key refused by the storage
            skipped.append(Skipped(key, str(exc)))
            continue
        backups.append(Listed(manifest, _stored_size(manifest, sizes)))
    return Catalogue(sorted(backups, key=lambda b: b.manifest.created, reverse=True), skipped)


def _read_manifest(storage: Storage, key: str) -> Manifest:
    manifest = Manifest.from_json(storage.read_text(key))
    # A manifest describes only the dump beside it: one naming any other key is never followed.
    own = key.removesuffix(".json") + (".dir" if manifest.format == "directory" else ".dump")
    if manifest.key != own or manifest.id != backup_id(own):
        raise ValueError(f"it names {manifest.key!r}, not its own dump {own!r}")
    storage.location(own)  # the storage refuses a dump that leads out of it (a symlink)
    return manifest


def _stored_size(manifest: Manifest, sizes: dict[str, int]) -> int | None:
    if manifest.format == "directory":
        inside = [size for key, size in sizes.items() if key.startswith(manifest.key + "/")]
        return sum(inside) if inside else None
    return sizes.get(manifest.key)


def list_backups(storage: Storage, target: DatabaseTarget) -> list[Manifest]:
    """Valid backups (a trustworthy manifest and an intact-looking dump), newest first."""
    return [b.manifest for b in catalogue(storage, target).backups if b.damage is None]


def find(storage: Storage, target: DatabaseTarget, wanted: str) -> Manifest:
    """The valid backup named ``<id>``, ``<id>.dump`` or ``<environment>/<database>/<id>.dump``."""
    name = wanted.rsplit("/", 1)[-1]
    for suffix in (".dump", ".dir", ".json"):  # ids contain a dot: no Path.stem here
        name = name.removesuffix(suffix)
    listing = catalogue(storage, target)
    for listed in listing.backups:
        if listed.manifest.id == name:
            if listed.damage:
                raise ConfigError(f"backup '{wanted}' is damaged ({listed.damage}): choose another one")
            return listed.manifest
    for skipped in listing.skipped:
        if skipped.id == name:
            raise ConfigError(f"the manifest of backup '{wanted}' is damaged ({skipped.reason}): choose another one")
    raise ConfigError(f"no valid backup '{wanted}' of {target.environment}/{target.database} in {storage!r}")


def check_retention(keep_last: int, keep_days: float | None) -> None:
    """Refuse a retention that could delete every backup, or is not a number of days."""
    if keep_last < 1:
        raise ConfigError(f"--keep-last {keep_last} refused: it could delete every backup; "
                          "keep at least 1 (the newest restorable backup always stays)")
    if keep_days is not None and not (math.isfinite(keep_days) and keep_days > 0):
        raise ConfigError(f"--keep-days must be a finite number of days above 0, not {keep_days}")


def prune(
    storage: Storage, target: DatabaseTarget, keep_last: int, keep_days: float | None, dry_run: bool = False,
    listing: Catalogue | None = None,
) -> list[Manifest]:
    """Delete backups beyond the newest ``keep_last`` (and older than ``keep_days``); the newest
    restorable backup always stays. ``listing``: the catalogue, if the caller already read it.
    Skipped (damaged) manifests are never followed: nothing they name is deleted."""
    check_retention(keep_last, keep_days)
    listing = catalogue(storage, target) if listing is None else listing
    keep = listing.newest_restorable()
    cutoff = _days_ago(keep_days) if keep_days is not None else None
    doomed = [
        b.manifest for b in listing.backups[keep_last:]
        if b is not keep and (cutoff is None or b.manifest.created < cutoff)
    ]
    if not dry_run:
        for m in doomed:
            storage.delete(m.manifest_key)  # manifest first: an object without one is never listed as valid
            storage.delete(m.key)
    return doomed


def _days_ago(days: float) -> datetime:
    try:
        return datetime.now(timezone.utc) - timedelta(days=days)
    except OverflowError:  # before the calendar starts: no backup is that old
        return datetime.min.replace(tzinfo=timezone.utc)
