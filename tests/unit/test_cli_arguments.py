"""The command line's parsing of numbers, revisions, names and paths: refused by argparse (exit 2,
one line) before anything connects."""

import pytest

from dbmigrate.cli import build_parser
from dbmigrate.cli.arguments import MAX_JOBS, MAX_SECONDS


def parse(*args: str):
    return build_parser().parse_args(list(args))


def refused(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exit_:
        parse(*args)
    assert exit_.value.code == 2
    [line] = capsys.readouterr().err.splitlines()
    assert line.startswith("dbmigrate: error: "), line
    return line


@pytest.mark.parametrize("option", ["--timeout", "--lock-timeout", "--statement-timeout", "--guard-wait", "--lock-wait",
                                    "--lock-retry-pause", "--lock-retry-total"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-1", "1e12", "ten", ""])
def test_seconds_must_be_finite_and_in_range(capsys, option, value):
    line = refused(capsys, "upgrade", f"{option}={value}")  # '=': argparse takes a lone -inf for an option
    named = line.removeprefix("dbmigrate: error: argument ").split(": ", 1)[0]  # --guard-wait/--lock-wait
    assert option in named.split("/") and repr(value) in line


def test_seconds_at_the_limits_are_taken():
    args = parse("upgrade", "--lock-timeout", "0", "--statement-timeout", str(MAX_SECONDS), "--guard-wait", "2.5")
    assert (args.lock_timeout, args.statement_timeout, args.guard_wait) == (0.0, MAX_SECONDS, 2.5)


def test_lock_retries_is_a_list_of_lock_timeouts_none_of_them_zero(capsys):
    assert parse("upgrade", "--lock-retries", "0.1, 0.5,2").lock_retries == (0.1, 0.5, 2.0)
    assert parse("upgrade").lock_retries == ()
    for value, why in (("0.1,0", "from 0.001 to"), ("0.1,,1", "not a number of seconds: ''"), ("1,nan", "'nan'")):
        line = refused(capsys, "upgrade", "--lock-retries", value)
        assert line.startswith("dbmigrate: error: argument --lock-retries: ") and why in line


def test_the_connect_timeout_must_be_at_least_one_second(capsys):
    assert "from 1 to" in refused(capsys, "status", "--timeout", "0")
    assert parse("status", "--timeout", "1").timeout == 1.0


@pytest.mark.parametrize("value", ["0", "-1", "1.5", "\u00b2", "", "two", str(MAX_JOBS + 1)])
@pytest.mark.parametrize("command", [["upgrade"], ["backup"], ["restore", "some-id"]], ids=lambda c: c[0])
def test_jobs_must_be_a_whole_number_from_1_to_the_maximum(capsys, command, value):
    line = refused(capsys, *command, "--jobs", value)
    assert "argument --jobs/-j: " in line and repr(value) in line


def test_jobs_in_range_are_taken():
    assert parse("backup", "--jobs", str(MAX_JOBS)).jobs == MAX_JOBS
    assert parse("backup").jobs == 1


@pytest.mark.parametrize("value", ["nan", "inf", "-1", "36501"])
def test_keep_days_must_be_a_finite_number_of_days(capsys, value):
    assert "argument --keep-days: must be a number of days" in refused(
        capsys, "backups", "prune", "--keep-last", "1", "--keep-days", value)


@pytest.mark.parametrize("command", ["upgrade", "downgrade"])
@pytest.mark.parametrize("revision", ["", "@", "0001@", " ", "0001 "], ids=repr)
def test_malformed_revisions_are_refused(capsys, command, revision):
    assert f"malformed revision {revision!r}" in refused(capsys, command, "-r", revision)


def test_upgrade_goes_to_head_unless_told_and_downgrade_must_be_told(capsys):
    assert parse("upgrade").revision == "head"
    assert parse("downgrade", "-r", "-1").revision == "-1"
    assert "the following arguments are required: --revision/-r" in refused(capsys, "downgrade")


@pytest.mark.parametrize("name", ["", "   ", "a\nb", "tab\there", "x" * 101], ids=["empty", "blank", "newline",
                                                                                   "tab", "too long"])
def test_an_approver_must_be_a_printable_name(capsys, name):
    assert f"argument --approver: not a name: {name!r}" in refused(capsys, "upgrade", "--approver", name)


def test_an_approver_name_is_trimmed():
    assert parse("restore", "some-id", "--approver", "  alice  ").approver == "alice"


def test_a_json_report_path_that_is_a_directory_is_refused(capsys, tmp_path):
    assert f"{str(tmp_path)!r} is a directory: name a file" in refused(
        capsys, "upgrade", "--json-report", str(tmp_path))


def test_a_json_report_under_a_file_is_refused(capsys, tmp_path):
    (tmp_path / "a-file").write_text("")
    path = tmp_path / "a-file" / "report.json"
    assert f"{tmp_path / 'a-file'} is not a writable directory" in refused(
        capsys, "upgrade", "--json-report", str(path))


def test_a_json_report_in_a_directory_still_to_be_made_is_taken(tmp_path):
    path = tmp_path / "new" / "dir" / "report.json"
    assert parse("upgrade", "--json-report", str(path)).json_report == path


def test_under_an_environments_policy_its_limits_apply_and_each_option_given_wins(monkeypatch):
    """The command line's settings are derived as the flows' are (Settings.under_policy): the policy's
    guard wait, timeouts and lock-retry schedule; an option given replaces only its own field."""
    from dbmigrate.cli.arguments import settings
    from dbmigrate.lockretry import LockRetries
    from dbmigrate.policy import for_environment
    from dbmigrate.settings import Settings

    monkeypatch.delenv("DBMIGRATE_SCRATCH_URL", raising=False)
    policy = for_environment("staging", guard_wait_s=30, lock_timeout_s=2, statement_timeout_s=600,
                             lock_retry_timeouts_s=[0.1, 1], lock_retry_total_s=120)
    flows = Settings.under_policy(policy)
    assert (flows.guard_wait_s, flows.limits.lock_timeout_s, flows.limits.statement_timeout_s) == (30, 2, 600)
    assert flows.lock_retries == LockRetries((0.1, 1), LockRetries.pause_s, 120)
    plain = settings(parse("upgrade"), policy)
    assert (plain.guard_wait_s, plain.limits, plain.lock_retries) == (flows.guard_wait_s, flows.limits,
                                                                      flows.lock_retries)
    given = settings(parse("upgrade", "--lock-timeout", "5", "--guard-wait", "0", "--lock-retry-pause", "0.3"),
                     policy)
    assert (given.guard_wait_s, given.limits.lock_timeout_s, given.limits.statement_timeout_s) == (0, 5, 600)
    assert given.lock_retries == LockRetries((0.1, 1), 0.3, 120)


def test_without_env_the_defaults_are_the_dataclasses(monkeypatch):
    from dbmigrate.cli.arguments import settings
    from dbmigrate.settings import Settings

    monkeypatch.delenv("DBMIGRATE_SCRATCH_URL", raising=False)
    for command in (["upgrade"], ["restore", "some-id"], ["backup"], ["status"]):
        assert settings(parse(*command)) == Settings.from_env(project_logging=False), command
