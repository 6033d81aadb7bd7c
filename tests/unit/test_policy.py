"""dbmigrate.policy: what each environment allows by default, and what an override may change."""

import pytest

from dbmigrate.errors import ConfigError
from dbmigrate.policy import RELAXED, STRICT, for_environment


@pytest.mark.parametrize("name", ["development", "staging", "local"])
def test_development_and_staging_roll_back_on_their_own(name):
    policy = for_environment(name)
    assert policy == RELAXED
    assert policy.auto_rollback and policy.cli_changes_allowed
    assert not policy.backup_required and not policy.approval_required


def test_production_needs_a_backup_and_an_approver_and_never_rolls_back_on_its_own():
    policy = for_environment("production")
    assert policy == STRICT
    assert policy.backup_required and policy.approval_required
    assert not policy.auto_rollback and not policy.cli_changes_allowed


@pytest.mark.parametrize("name", ["prod", "Production", "qa", ""])
def test_an_unknown_environment_gets_the_production_rules(name):
    assert for_environment(name) == STRICT


def test_overrides_change_only_what_they_name():
    policy = for_environment("production", approval_required=False, lock_timeout_s=3.0)
    assert not policy.approval_required and policy.lock_timeout_s == 3.0
    assert policy.backup_required and not policy.auto_rollback, "the rest stays strict"
    assert for_environment("production") == STRICT, "the defaults themselves are not changed"


def test_an_unknown_override_is_refused_by_name():
    with pytest.raises(ConfigError, match=r"unknown policy setting\(s\): approvers, backup"):
        for_environment("staging", backup=False, approvers=["alice"])


def test_a_policy_requiring_a_backup_refuses_a_run_without_one():
    with pytest.raises(ConfigError, match="requires a backup before migrating: backup=false is refused"):
        STRICT.check(backup=False)
    STRICT.check(backup=True)
    RELAXED.check(backup=False)


def test_lock_retries_are_off_by_default_and_an_override_sets_the_schedule():
    from dbmigrate.lockretry import LockRetries

    assert for_environment("production").lock_retries() == LockRetries() and not LockRetries().enabled
    policy = for_environment("production", lock_retry_timeouts_s=[0.1, 0.5, 1], lock_retry_total_s=30)
    assert policy.lock_retries() == LockRetries((0.1, 0.5, 1), 1.0, 30)
    timeouts = LockRetries((0.1, 0.5)).lock_timeouts()
    assert [next(timeouts) for _ in range(4)] == [0.1, 0.5, 0.5, 0.5], "the last repeats"
def test_lint_findings_block_in_production_and_warn_elsewhere():
    assert for_environment("production").lint_blocking_level == "warning"
    assert for_environment("qa").lint_blocking_level == "warning", "an unknown environment blocks too"
    assert for_environment("staging").lint_blocking_level is None
    assert for_environment("staging", lint_blocks=True, lint_level="error").lint_blocking_level == "error"


def test_an_unknown_lint_level_is_refused():
    with pytest.raises(ConfigError, match=r"lint_level must be one of warning, error: 'fatal'"):
        for_environment("production", lint_level="fatal")
def test_production_rehearses_and_so_refuses_a_run_without_its_backup():
    assert STRICT.rehearse and not RELAXED.rehearse
    with pytest.raises(ConfigError, match="rehearses on a copy restored from the run's backup: backup=false"):
        for_environment("production", backup_required=False).check(backup=False)
    for_environment("staging", rehearse=True).check(backup=True)
