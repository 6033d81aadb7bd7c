"""What the command line prints: a run's outcome and its error line, the lint, the rehearsal, and
JSON alone on stdout under ``--json``."""

from __future__ import annotations

import contextlib
import json
import os
import sys
from typing import TYPE_CHECKING, Iterator

from dbmigrate import revisions
from dbmigrate.target import DatabaseTarget

if TYPE_CHECKING:  # the read-only commands print without importing the pipeline or the report (docs/BENCHMARKS.md)
    from dbmigrate import pipeline
    from dbmigrate.lint import LintResult
    from dbmigrate.report import Rehearsal, Report

_json_stdout = None  # under --json, while the command runs: the real stdout (fd 1 points at stderr meanwhile)


def print_json(data) -> None:
    print(json.dumps(data, indent=2, default=str), file=_json_stdout or sys.stdout, flush=True)


@contextlib.contextmanager
def json_alone_on_stdout(as_json: bool) -> Iterator[None]:
    """Under --json, stdout carries the JSON alone: while the command runs, file descriptor 1
    points at stderr, so what a project's env.py or revisions print or log (Python's print, C
    code, a subprocess; the lint's offline rendering too) lands on stderr, and the JSON goes to
    the real stdout, kept aside."""
    global _json_stdout
    if not as_json:
        yield
        return
    sys.stdout.flush()
    _json_stdout = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(_json_stdout.fileno(), 1)
        _json_stdout.close()
        _json_stdout = None


def print_progress(size: int, rate: float) -> None:
    from dbmigrate import health

    print(f"backup: {health.human_bytes(size)} written, {health.human_bytes(rate)}/s", file=sys.stderr, flush=True)


def print_outcome(outcome: pipeline.Outcome) -> None:
    report = outcome.report
    if outcome.sql is not None:
        print(outcome.sql, end="")
    if report.backup:
        b = report.backup
        print(f"backup:   {b.location} ({b.size_bytes} bytes, sha256 {b.sha256[:12]}, {b.duration_s}s)")
    for line in lint_lines(report.lint) if report.lint else []:
        print(f"lint:     {line}")
    verb = "applied: " if report.operation == "upgrade" else "reverted:"
    for step in report.migrations_applied:
        print(f"{verb} {step.revision}  {step.message}  ({round(step.duration_s, 3)}s)")
    print(f"{report.operation} {summary(report)} ({report.duration_s}s)")
    print(f"report:   {outcome.report_path or 'not written (see stderr)'}")


def finish(outcome: pipeline.Outcome, target: DatabaseTarget, as_json: bool) -> int:
    """The error line and the exit code. A report that could not be written is said in the same
    line as what happened to the database, and the report goes to stderr instead (--json: stdout has it)."""
    report, error, report_error = outcome.report, outcome.error, outcome.report_error
    if error is None and report_error is None:
        return 0
    if error is None:
        line = f"{report.operation} {summary(report)}, but {report_error}"
    else:
        line = f"{error}" + (f"; and {report_error}" if report_error else "")
    print(f"dbmigrate: error: {target.redact(line)}", file=sys.stderr)
    if report_error is not None and not as_json:
        print(report.to_json(), end="", file=sys.stderr)
    return (error or report_error).exit_code


def summary(report: Report) -> str:
    from dbmigrate.report import DRY_RUN, NOOP, SUCCEEDED

    before = revisions.shown(report.revision_before)
    if report.status == NOOP:
        return f"had nothing to do: database already at {before}"
    if report.status == DRY_RUN:
        return f"dry run: {len(report.migrations_planned)} revision(s) from {before}; nothing was changed"
    if report.status == SUCCEEDED:
        return f"succeeded: {before} -> {revisions.shown(report.revision_after)}"
    if report.error.phase in ("migrate", "validate"):
        unknown = report.revision_after_unknown is not None
        at = "an unknown revision" if unknown else revisions.shown(report.revision_after)
        return f"failed in {report.error.phase}: database at {at}"
    return f"failed in {report.error.phase}: nothing was changed"


def lint_lines(result: LintResult) -> list[str]:
    """The lint as text: per revision, its findings, its exceptions, or why it was not linted."""
    lines = []
    for rev in result.revisions:
        lines += [f"{rev.revision}  {f.shown()}" for f in rev.findings]
        lines += [f"{rev.revision}  excepted {e.rule} ({e.findings} finding(s)): {e.reason}" for e in rev.excepted]
        if rev.not_linted and not rev.findings:  # else its finding (unrenderable) says so
            lines.append(f"{rev.revision}  not linted: {rev.not_linted}")
    return lines


def rehearsal_lines(result: Rehearsal) -> list[str]:
    lines = [f"rehearsed on a copy restored from backup {result.backup_id} (restore {result.restore_s:.1f}s):"]
    for step in result.steps:
        lines.append(f"  {step.revision}  {step.message}  ({step.duration_s:.3f}s)")
        lines += [f"    lock {lock.mode} on {lock.relation}, held {lock.held_s:.3f}s" for lock in step.locks]
        lines += [f"    rewrote {table} ({rows} rows)" for table, rows in step.tables_rewritten.items()]
        lines += [f"    wrote {rows} rows of {table}" for table, rows in step.rows_written.items()]
    if result.failed:
        lines.append(f"  failed: {result.failed}")
    return lines
