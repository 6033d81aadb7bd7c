"""Lock-safety lint of pending revisions with squawk (the ``squawk-cli`` package's binary).

Each pending revision is rendered on its own as Alembic's offline mode renders it
(:func:`dbmigrate.migrate.render_revision`: env.py's own BEGIN/COMMIT included), and squawk
reads all of them in one call. Squawk sees the real transaction structure, so it is not
told to assume one (``--assume-in-transaction`` would make Alembic's own BEGIN a nested
transaction). A revision file may carry reviewed exceptions, one rule each::

    # dbmigrate: allow require-concurrent-index-creation -- table is empty at deploy time

Findings of an excepted rule are recorded as excepted, not as findings. Only a Python comment
counts (read with :mod:`tokenize`): the same words inside a string, such as the SQL a revision
executes, are not an exception. A revision that cannot be rendered offline is the finding
``unrenderable`` at the highest level (its SQL is unchecked), excepted the same way.

The squawk run is ``$DBMIGRATE_SQUAWK`` if set, else the one the squawk-cli package installed
beside this Python's scripts; each call is bounded by ``$DBMIGRATE_SQUAWK_TIMEOUT`` seconds
(default :data:`SQUAWK_TIMEOUT_S`).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
import sysconfig
import tempfile
import tokenize
from collections.abc import Iterator
from contextlib import contextmanager, redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

from dbmigrate import migrate
from dbmigrate.errors import ConfigError, DbMigrateError, MigrationFailed, first_line
from dbmigrate.policy import LINT_LEVELS as LEVELS
from dbmigrate.revisions import PlannedStep, Project

# Rules squawk applies by default that this lint turns off, and why.
RULES_OFF = (
    # dbmigrate sets lock_timeout (and the policy's statement_timeout) for every migration session itself.
    "require-lock-timeout", "require-statement-timeout",
    # Advice on column types, on every CREATE TABLE: schema design for review, not what a migration does to a live table.
    "prefer-bigint-over-int", "prefer-bigint-over-smallint", "prefer-identity", "prefer-text-field",
    "prefer-timestamp-tz", "ban-char-field",
)
EXCEPTION_FORM = "# dbmigrate: allow RULE -- REASON"
_EXCEPTION = re.compile(r"#\s*dbmigrate:\s*allow\b(.*)")
_RULE_AND_REASON = re.compile(r"\s+([a-z0-9]+(?:-[a-z0-9]+)*)\s+--\s*(\S.*?)\s*")
_A_WORD = re.compile(r"\w")  # a reason says something: "--" or "..." alone is not one
# Ours, not squawk's: a revision that cannot be rendered offline, so squawk never sees its SQL.
UNRENDERABLE = "unrenderable"
SQUAWK_VARIABLE, SQUAWK_TIMEOUT_VARIABLE = "DBMIGRATE_SQUAWK", "DBMIGRATE_SQUAWK_TIMEOUT"
SQUAWK_TIMEOUT_S = 60.0  # squawk lints a revision in milliseconds: a minute means it hangs


@dataclass(frozen=True)
class Finding:
    rule: str
    level: str  # warning | error
    message: str
    line: int  # in the revision's rendered SQL, from 1
    statement: str  # the first line of the statement it is about

    def shown(self) -> str:
        if not self.line:  # about the revision as a whole (unrenderable)
            return f"{self.rule} ({self.level}): {self.message}"
        return f"{self.rule} ({self.level}) at line {self.line} ({self.statement}): {self.message}"


@dataclass(frozen=True)
class Excepted:
    """A reviewed exception from the revision file, and how many findings it covered."""

    rule: str
    reason: str
    line: int  # in the revision file
    findings: int = 0


@dataclass
class RevisionLint:
    revision: str
    message: str
    findings: list[Finding] = field(default_factory=list)
    excepted: list[Excepted] = field(default_factory=list)
    not_linted: str | None = None  # why the revision could not be rendered offline (it is then not checked)


@dataclass
class LintResult:
    pg_version: str
    revisions: list[RevisionLint]
    rules_off: tuple[str, ...] = RULES_OFF
    blocking_level: str | None = None  # None: findings only warn in this environment
    duration_s: float | None = None  # rendering and squawk: it grows with the revisions linted

    def findings(self, level: str = LEVELS[0]) -> list[tuple[str, Finding]]:
        """(revision, finding) at or above ``level``."""
        return [(r.revision, f) for r in self.revisions for f in r.findings
                if LEVELS.index(f.level) >= LEVELS.index(level)]

    def blocking(self) -> list[tuple[str, Finding]]:
        return self.findings(self.blocking_level) if self.blocking_level else []


class LintBlocked(MigrationFailed):
    """Findings at or above the environment's blocking level: nothing was run."""


def squawk_binary() -> Path:
    """``$DBMIGRATE_SQUAWK``, else the squawk the squawk-cli package installed beside this Python's scripts."""
    if os.environ.get(SQUAWK_VARIABLE):
        path = Path(os.environ[SQUAWK_VARIABLE])
        if not path.is_file():
            raise ConfigError(f"{SQUAWK_VARIABLE} names no file: {path}")
        return path
    path = Path(sysconfig.get_path("scripts")) / "squawk"
    if not path.is_file():
        raise ConfigError(f"squawk is not installed ({path} is missing): pip install 'squawk-cli>=2.70,<3'")
    return path


def squawk_timeout() -> float:
    """How long one squawk call may take: ``$DBMIGRATE_SQUAWK_TIMEOUT`` seconds, else SQUAWK_TIMEOUT_S."""
    given = os.environ.get(SQUAWK_TIMEOUT_VARIABLE)
    if not given:
        return SQUAWK_TIMEOUT_S
    try:
        seconds = float(given)
    except ValueError:
        seconds = 0.0
    if not 0 < seconds < float("inf"):
        raise ConfigError(f"{SQUAWK_TIMEOUT_VARIABLE} must be a number of seconds above 0: {given!r}")
    return seconds


def exceptions(path: Path) -> list[Excepted]:
    """The reviewed exceptions in a revision file's comments; a malformed one is an error naming its line."""
    found = []
    for number, comment in _comments(path):
        match = _EXCEPTION.search(comment)
        if not match:
            continue
        rule_and_reason = _RULE_AND_REASON.fullmatch(match.group(1))
        if not rule_and_reason:
            raise ConfigError(f"{path}:{number}: malformed lint exception: write '{EXCEPTION_FORM}'")
        if not _A_WORD.search(rule_and_reason.group(2)):
            raise ConfigError(f"{path}:{number}: lint exception gives no reason after '--': write '{EXCEPTION_FORM}'")
        found.append(Excepted(rule_and_reason.group(1), rule_and_reason.group(2), number))
    return found


def _comments(path: Path) -> Iterator[tuple[int, str]]:
    """(line, text) of each Python comment in the file that may be an exception: not the text of its strings."""
    source = path.read_text()
    if not _EXCEPTION.search(source):  # most files have none: no need to tokenize them
        return
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            if token.type == tokenize.COMMENT:
                yield token.start[0], token.string
    except (tokenize.TokenError, SyntaxError) as exc:  # Alembic would not load it either
        raise ConfigError(f"{path}: cannot read its comments: {first_line(exc)}") from None


def _check_rules(squawk: Path, excepted: dict[Path, list[Excepted]]) -> None:
    """Squawk itself knows its rules: an exception naming another is an error naming its file and line."""
    rules = sorted({e.rule for found in excepted.values() for e in found} - {UNRENDERABLE})
    if not rules:
        return
    done = _run(squawk, [f"--exclude={','.join(rules)}", "--reporter", "json"])
    unknown = re.search(r"invalid rule name (\S+)", done.stderr)
    if unknown:
        path, line = next((p, e.line) for p, found in excepted.items() for e in found if e.rule == unknown[1])
        raise ConfigError(f"{path}:{line}: lint exception names an unknown squawk rule '{unknown[1]}'")


def _run(squawk: Path, args: list[str], cwd: str | None = None) -> subprocess.CompletedProcess:
    """One squawk call, bounded by squawk_timeout(); a squawk that cannot run or hangs is one line.
    Its own session, so that a hung squawk is killed with whatever it started."""
    timeout = squawk_timeout()
    try:
        proc = subprocess.Popen([squawk, *args], cwd=cwd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
    except OSError as exc:  # not executable, not a program, a missing interpreter
        raise ConfigError(f"squawk cannot be run ({squawk}): {exc.strerror or exc}") from None
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        raise DbMigrateError(f"squawk ({squawk}) did not finish within {timeout:g}s (set {SQUAWK_TIMEOUT_VARIABLE} "
                             "to wait longer): nothing was linted") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def lint(project: Project, steps: list[PlannedStep], pg_version: str) -> LintResult:
    """Lint the upgrade of each of ``steps``; raises ConfigError for a malformed exception."""
    started = time.monotonic()
    squawk = squawk_binary()
    files = {s.revision: Path(project.script.get_revision(s.revision).path) for s in steps}
    excepted = {path: exceptions(path) for path in files.values()}
    _check_rules(squawk, excepted)
    results, sql = [], {}
    with _alembic_quiet(), _printed_aside(", ".join(s.revision for s in steps)):
        rendered = migrate.render_revisions(project, [s.revision for s in steps])
    for step in steps:
        results.append(RevisionLint(step.revision, step.message))
        if isinstance(rendered[step.revision], Exception):  # env.py or the revision needs a live connection
            results[-1].not_linted = f"cannot be rendered offline: {first_line(rendered[step.revision])}"
        else:
            sql[step.revision] = rendered[step.revision]
    raw = _squawk(squawk, sql, pg_version)
    for result in results:
        allowed = excepted[files[result.revision]]
        if result.not_linted:
            _unrenderable(result, allowed)
        else:
            _sort(result, raw.get(result.revision, []), sql[result.revision], allowed)
    return LintResult(pg_version, results, duration_s=round(time.monotonic() - started, 3))


def _unrenderable(result: RevisionLint, allowed: list[Excepted]) -> None:
    """Unchecked SQL is a finding at the highest level, so it blocks wherever the policy blocks, unless excepted."""
    result.excepted = [Excepted(e.rule, e.reason, e.line, int(e.rule == UNRENDERABLE)) for e in allowed]
    if not any(e.rule == UNRENDERABLE for e in allowed):
        result.findings.append(Finding(UNRENDERABLE, LEVELS[-1], f"not linted: {result.not_linted}", 0, ""))


@contextmanager
def _alembic_quiet() -> Iterator[None]:
    """Without Alembic's four INFO lines per rendered revision ("Generating static SQL"...): the
    lint shows its findings. A filter, not a level: env.py's fileConfig resets levels on every render."""
    logger = logging.getLogger("alembic.runtime.migration")
    logger.addFilter(_drop)
    try:
        yield
    finally:
        logger.removeFilter(_drop)


def _drop(record: logging.LogRecord) -> bool:
    return False


@contextmanager
def _printed_aside(revisions: str) -> Iterator[None]:
    """What env.py and a revision print while rendered offline (a project's offline branch warns
    `alembic upgrade --sql` users: "All rows in the t table will be deleted") is not what the run
    does: kept out of the run's output, on the debug log only."""
    aside = _Aside(sys.stdout)
    try:
        with redirect_stdout(aside):
            yield
    finally:
        aside.kept_aside = False
        if aside.printed.getvalue().strip():
            logging.getLogger(__name__).debug("rendering %s offline printed: %s", revisions, aside.printed.getvalue())


class _Aside(io.TextIOBase):
    """sys.stdout during an offline rendering. A logging handler env.py creates meanwhile keeps
    this object: once the rendering is over it writes to the real stdout again."""

    def __init__(self, real):
        self.real, self.printed, self.kept_aside = real, io.StringIO(), True

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        return (self.printed if self.kept_aside else self.real).write(text)

    def flush(self) -> None:
        self.real.flush()


def _squawk(squawk: Path, sql: dict[str, str], pg_version: str) -> dict[str, list[dict]]:
    """One squawk call over every revision's SQL: its JSON findings by revision."""
    if not sql:
        return {}
    with tempfile.TemporaryDirectory(prefix="dbmigrate-lint-") as tmp:
        names = {}
        for index, (revision, text) in enumerate(sql.items()):
            name = f"{index:04d}.sql"
            (Path(tmp) / name).write_text(text)
            names[name] = revision
        # cwd: the temporary directory, so no stray .squawk.toml above the caller's directory applies
        done = _run(squawk, ["--reporter", "json", f"--pg-version={pg_version}",
                             f"--exclude={','.join(RULES_OFF)}", *names], cwd=tmp)
    if done.returncode not in (0, 1):
        why = (done.stderr.strip().splitlines() or ["no message"])[0]
        raise DbMigrateError(f"squawk failed (exit {done.returncode}): {why}")
    found: dict[str, list[dict]] = {}
    try:
        for item in json.loads(done.stdout or "[]"):
            found.setdefault(names[Path(item["file"]).name], []).append(
                {"rule_name": str(item["rule_name"]), "level": str(item["level"]), "message": str(item["message"]),
                 "line": int(item["line"])})
    except (ValueError, TypeError, KeyError, AttributeError):  # not the JSON report squawk writes
        shown = (done.stdout.strip().splitlines() or [""])[0][:80]
        raise DbMigrateError(f"squawk ({squawk}) printed something other than its JSON report: {shown!r}") from None
    return found


def _sort(result: RevisionLint, raw: list[dict], sql: str, allowed: list[Excepted]) -> None:
    """Findings into the revision's findings, or counted against the exception that covers them."""
    lines = sql.splitlines()
    covered = {e.rule: 0 for e in allowed}
    for item in raw:
        if item["rule_name"] in covered:
            covered[item["rule_name"]] += 1
            continue
        line = item["line"]  # squawk counts lines from 0
        result.findings.append(Finding(item["rule_name"], item["level"].lower(), item["message"], line + 1,
                                       lines[line].strip() if line < len(lines) else ""))
    result.excepted = [Excepted(e.rule, e.reason, e.line, covered[e.rule]) for e in allowed]


def pg_version(server_version: str) -> str:
    """squawk's --pg-version from PostgreSQL's server_version ("16.4 (Debian ...)" -> "16.4")."""
    match = re.match(r"(\d+)(?:\.(\d+))?", server_version)
    if not match:
        raise DbMigrateError(f"cannot read the PostgreSQL version from {server_version!r}")
    return f"{match[1]}.{match[2] or 0}"


def blocked_message(result: LintResult, environment: str) -> str:
    blocking = result.blocking()
    shown = "; ".join(f"revision {revision}: {finding.shown()}" for revision, finding in blocking)
    return (f"lint: {len(blocking)} finding(s) at or above {result.blocking_level} block this run in {environment}: "
            f"{shown}; after review, except a rule in the revision file with '{EXCEPTION_FORM}'")
