"""An environment's blocks from variables: what ``dbmigrate blocks sync --env NAME --from-env``
runs (GitHub Actions and operators), and ``dbmigrate local up`` for the local stack's three.

The variables (all checked before anything is written; a missing or unusable one names itself:
a host or name with a control character, a quote or an outer space, a name over PostgreSQL's 63 bytes):

- ``DB_HOST``, ``DB_NAME``, ``DB_USER``, ``DB_PASSWORD`` (required), ``DB_PORT``, ``DB_SSLMODE``:
  the ``DatabaseCredentials`` block named after the environment;
- ``BACKUP_BUCKET`` (and ``BACKUP_BUCKET_FOLDER``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``,
  ``AWS_SESSION_TOKEN``, ``AWS_REGION``, ``AWS_ENDPOINT_URL`` for an S3-compatible store): an
  ``S3Bucket`` block ``<env>-backups`` with its ``AwsCredentials`` ``<env>-aws``; a run uses it
  with ``backup_storage=s3-bucket/<env>-backups`` (or DBMIGRATE_BACKUP_STORAGE on the worker);
- with ``alerts`` (``blocks sync``), ``ALERT_WEBHOOK_URL`` and ``ALERT_SLACK_WEBHOOK_URL``: notification
  blocks and the environment's automations (:mod:`blocks.alerts`);
- one of ``FLEET_MEMBERS`` (credentials block names), ``FLEET_DATABASES`` (database names on the server
  of ``DB_*``) or ``FLEET_QUERY`` (SQL selecting them there when the fleet runs), with ``FLEET_CANARY``
  and ``FLEET_SKIP_UNREACHABLE``: the ``DatabaseFleet`` block ``<env>-fleet`` (:mod:`blocks.fleet`). A
  list is comma-separated, or a JSON array (for a name holding a comma).

A block that exists gets only the fields the variables set, and only where they differ: fields
set in the UI are kept, and a re-run that changes nothing writes nothing.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from prefect.blocks.core import Block
from prefect.blocks.notifications import CustomWebhookNotificationBlock
from prefect.types import SecretDict
from pydantic import BaseModel, SecretStr, ValidationError

from blocks import ENVIRONMENT_NAME, DatabaseCredentials, EnvironmentPolicy, require_api
from blocks.alerts import VARIABLES as ALERT_VARIABLES
from blocks.alerts import sync_automations
from blocks.alerts import wanted_blocks as alert_blocks
from blocks.fleet import DatabaseFleet, fleet_block_name, unusable_database_name
from dbmigrate.errors import ConfigError

# variable -> field of the block it sets (a dotted field is one inside a nested model)
DATABASE = {"DB_HOST": "host", "DB_PORT": "port", "DB_NAME": "database", "DB_USER": "username",
            "DB_PASSWORD": "password", "DB_SSLMODE": "sslmode"}
REQUIRED = ("DB_HOST", "DB_NAME", "DB_USER", "DB_PASSWORD")
BUCKET = {"BACKUP_BUCKET": "bucket_name", "BACKUP_BUCKET_FOLDER": "bucket_folder"}
AWS = {"AWS_ACCESS_KEY_ID": "aws_access_key_id", "AWS_SECRET_ACCESS_KEY": "aws_secret_access_key",
       "AWS_SESSION_TOKEN": "aws_session_token", "AWS_REGION": "region_name",
       "AWS_ENDPOINT_URL": "aws_client_parameters.endpoint_url"}
KEY_PAIR = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
FLEET = {"FLEET_MEMBERS": "members", "FLEET_DATABASES": "databases", "FLEET_QUERY": "query",
         "FLEET_CANARY": "canary", "FLEET_SKIP_UNREACHABLE": "skip_unreachable"}
FLEET_SOURCES = ("FLEET_MEMBERS", "FLEET_DATABASES", "FLEET_QUERY")
# The environment names the blocks: Prefect's block names allow lowercase letters, digits and dashes.
BLOCK_NAME = re.compile(r"[a-z0-9][a-z0-9-]{0,62}")
# A host name, an IPv4 or IPv6 address, or a socket directory (libpq's host=/path).
HOST = re.compile(r"[A-Za-z0-9._:-]{1,253}|/.*")
IDENTIFIER_BYTES = 63  # PostgreSQL's NAMEDATALEN - 1: a database or role name is never longer


@dataclass(frozen=True)
class Synced:
    """What syncing did to one block: created, updated (which fields) or unchanged. Never a value."""

    block: str  # type-slug/name, as `prefect block inspect` takes it
    action: str
    fields: tuple[str, ...] = ()

    def __str__(self) -> str:
        return f"{self.block}: {self.action}" + (f": {', '.join(self.fields)}" if self.fields else "")


@dataclass(frozen=True)
class _Wanted:
    """A block to sync: its class, name, and the fields the variables set."""

    cls: type[Block]
    name: str
    fields: dict

    @property
    def label(self) -> str:
        return f"{self.cls.get_block_type_slug()}/{self.name}"


def storage_spec(environment: str) -> str:
    """The backup storage a run of ``environment`` names to use the bucket synced for it."""
    return f"s3-bucket/{environment}-backups"


def sync_environment(environment: str, variables: Mapping[str, str], alerts: bool = False) -> list[Synced]:
    """Register the block types and create or update ``environment``'s blocks from ``variables``;
    with ``alerts``, its notification blocks and automations too (none without their variables)."""
    given = {k: v for k, v in variables.items() if v}
    wanted = _wanted(environment, given)
    notifiers = [_Wanted(CustomWebhookNotificationBlock, name, fields)
                 for name, fields in alert_blocks(environment, given)] if alerts else []
    for block in notifiers:
        _validated(block.cls, block.fields)
    require_api()
    register_types(s3=any(block.cls.get_block_type_slug() == "s3-bucket" for block in wanted))
    synced = [_sync(block) for block in wanted + notifiers]
    if notifiers:
        ids = [_load(block)._block_document_id for block in notifiers]
        synced += [Synced(f"automation/{name}", action) for name, action in sync_automations(environment, ids)]
    elif alerts:
        synced.append(Synced(f"alerts of {environment}", f"none ({' or '.join(ALERT_VARIABLES)} not set)"))
    return synced


def register_types(s3: bool = False) -> None:
    DatabaseCredentials.register_type_and_schema()
    EnvironmentPolicy.register_type_and_schema()
    DatabaseFleet.register_type_and_schema()
    if s3:
        from prefect_aws import AwsCredentials, S3Bucket

        AwsCredentials.register_type_and_schema()
        S3Bucket.register_type_and_schema()


def _wanted(environment: str, given: dict[str, str]) -> list[_Wanted]:
    """The blocks the variables describe, each validated: a bad or missing variable is refused
    (by name, never by value) before anything is written."""
    if not (re.fullmatch(ENVIRONMENT_NAME, environment) and BLOCK_NAME.fullmatch(environment)):
        raise ConfigError(f"not an environment name: {environment!r} (it names Prefect blocks: up to 63 lowercase "
                          "letters, digits and -)")
    missing = [name for name in REQUIRED if name not in given]
    if missing:
        raise ConfigError(f"missing {', '.join(missing)}: set them to sync the blocks of {environment}")
    for name in ("DB_HOST", "DB_NAME", "DB_USER"):
        if problem := _unusable(name, given[name]):
            raise ConfigError(f"{name} {problem}: nothing was written")
    wanted = [_Wanted(DatabaseCredentials, environment, _fields(DATABASE, given))]
    if "BACKUP_BUCKET" in given:
        from prefect_aws import AwsCredentials, S3Bucket

        if len([name for name in KEY_PAIR if name in given]) == 1:
            raise ConfigError(f"{' and '.join(KEY_PAIR)} go together: set both, or neither "
                              "(the worker's own AWS credentials)")
        wanted += [_Wanted(AwsCredentials, f"{environment}-aws", _fields(AWS, given)),
                   _Wanted(S3Bucket, f"{environment}-backups", _fields(BUCKET, given))]
    if fleet := _fleet_fields(environment, given):
        wanted.append(_Wanted(DatabaseFleet, fleet_block_name(environment), fleet))
    for block in wanted:
        _validated(block.cls, block.fields)
    return wanted


def _fleet_fields(environment: str, given: dict[str, str]) -> dict | None:
    """The fleet block's fields, every source among them (the ones not given emptied: a fleet moved
    from a list to a query must not keep the list), or None where no FLEET_ variable is set."""
    sources = [name for name in FLEET_SOURCES if name in given]
    if not sources:
        if others := [name for name in FLEET if name in given]:
            raise ConfigError(f"{', '.join(others)} need{'s' if len(others) == 1 else ''} one of "
                              f"{', '.join(FLEET_SOURCES)}: nothing was written")
        return None
    if len(sources) > 1:
        raise ConfigError(f"give one of {', '.join(FLEET_SOURCES)}, not {' and '.join(sources)}: nothing was written")
    fields = {"environment": environment, "members": None, "credentials": environment, "databases": None,
              "query": None, "canary": _names("FLEET_CANARY", given.get("FLEET_CANARY", ""))}
    source = sources[0]
    if source == "FLEET_QUERY":
        fields["query"] = given[source]
    else:
        fields[FLEET[source]] = _names(source, given[source])
        if source == "FLEET_MEMBERS":
            fields["credentials"] = None
        for database in fields["databases"] or []:
            if problem := unusable_database_name(database):
                raise ConfigError(f"FLEET_DATABASES: a name {problem}: nothing was written")
    if "FLEET_SKIP_UNREACHABLE" in given:
        fields["skip_unreachable"] = given["FLEET_SKIP_UNREACHABLE"]
    return fields


def _names(variable: str, value: str) -> list[str]:
    """A list variable: a JSON array of strings, else comma-separated (spaces around a name dropped)."""
    if value.lstrip().startswith("["):
        try:
            names = json.loads(value)
        except ValueError:
            names = None
        if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
            raise ConfigError(f"{variable} is not a JSON array of strings: nothing was written")
        return names
    return [name.strip() for name in value.split(",") if name.strip()]


def _unusable(name: str, value: str) -> str | None:
    """Why a connection could never use ``value`` (never the value itself), or None: what the block
    would otherwise save and only the first run would find out."""
    if not value.isprintable():
        return "holds a control character (a newline?)"
    if value != value.strip():
        return "begins or ends with a space"
    if "'" in value or '"' in value:
        return "holds a quote"
    if name == "DB_HOST":
        return None if HOST.fullmatch(value) else "is not a host name, an IP address or a socket directory"
    size = len(value.encode())
    return f"is {size} bytes long: PostgreSQL names are at most {IDENTIFIER_BYTES}" if size > IDENTIFIER_BYTES else None


def _fields(variables: dict[str, str], given: dict[str, str]) -> dict:
    return {field: given[name] for name, field in variables.items() if name in given}


def _validated(cls: type[Block], fields: dict) -> Block:
    """The block built from ``fields``; a value it refuses is named by its variable."""
    if cls.get_block_type_slug() == "s3-bucket" and "credentials" not in fields:  # <env>-aws: checked on its own
        from prefect_aws import AwsCredentials

        fields = {**fields, "credentials": AwsCredentials()}
    try:
        return cls(**_nested(fields))
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"])
        names = {f: v for mapping in (DATABASE, BUCKET, AWS, FLEET) for v, f in mapping.items()}
        raise ConfigError(f"{names.get(field, field)}: {error['msg']}") from None


def _sync(wanted: _Wanted) -> Synced:
    fields = dict(wanted.fields)
    if wanted.cls.get_block_type_slug() == "s3-bucket":  # a reference to the credentials block synced before it
        from prefect_aws import AwsCredentials

        fields["credentials"] = AwsCredentials.load(wanted.name.removesuffix("-backups") + "-aws")
    existing = _load(wanted)
    if existing is None:
        wanted.cls(**_nested(fields)).save(wanted.name)
        return Synced(wanted.label, "created")
    new = _validated(wanted.cls, fields)
    changed = tuple(f for f in fields if _plain(_get(existing, f)) != _plain(_get(new, f)))
    if not changed:
        return Synced(wanted.label, "unchanged")
    _updated(existing, {f: fields[f] for f in changed}).save(wanted.name, overwrite=True)
    return Synced(wanted.label, "updated", changed)


def _load(wanted: _Wanted) -> Block | None:
    try:
        return wanted.cls.load(wanted.name)
    except ValueError:  # no block of that name
        return None
    except Exception as exc:  # a document that no longer validates: say which, in one line
        raise ConfigError(f"cannot read block {wanted.label}: {type(exc).__name__}: {exc}") from None


def _updated(existing: Block, changes: dict) -> Block:
    """``existing`` with ``changes`` applied, validated; every other field as it was (nested
    blocks stay references to their documents)."""
    values = {name: getattr(existing, name) for name in type(existing).model_fields}
    for path, value in changes.items():
        head, _, inner = path.partition(".")
        values[head] = values[head].model_copy(update={inner: value}) if inner else value
    return type(existing)(**values)


def _nested(fields: dict) -> dict:
    """{"a.b": 1} -> {"a": {"b": 1}}: the constructor's shape."""
    out: dict = {}
    for path, value in fields.items():
        head, _, inner = path.partition(".")
        if inner:
            out.setdefault(head, {})[inner] = value
        else:
            out[head] = value
    return out


def _get(block: BaseModel, path: str):
    value = block
    for part in path.split("."):
        value = getattr(value, part, None)
    return value


def _plain(value):
    """A field's value to compare: secrets by their value, a saved block by its document."""
    if isinstance(value, (SecretStr, SecretDict)):
        return value.get_secret_value()
    if isinstance(value, Block) and value._block_document_id:
        return value._block_document_id
    if isinstance(value, BaseModel):
        return {name: _plain(v) for name, v in value}
    return value
