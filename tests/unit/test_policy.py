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


def test_production_rehearses_and_so_refuses_a_run_without_its_backup():
    assert STRICT.rehearse and not RELAXED.rehearse
    with pytest.raises(ConfigError, match="rehearses on a copy restored from the run's backup: backup=false"):
        for_environment("production", backup_required=False).check(backup=False)
    for_environment("staging", rehearse=True).check(backup=True)
