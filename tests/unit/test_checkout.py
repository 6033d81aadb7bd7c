"""prefect.yaml's pull step (flows/pull.py): which directories a worker may run the flows from."""

import shutil
from pathlib import Path

import pytest

from dbmigrate.errors import ConfigError
from flows.pull import checkout

REPO = Path(__file__).resolve().parents[2]


def test_this_checkout_is_taken(monkeypatch):
    monkeypatch.setenv("DBMIGRATE_CHECKOUT", f" {REPO} ")
    assert checkout() == REPO


@pytest.mark.parametrize("value, message", [
    (None, "DBMIGRATE_CHECKOUT is not set in the worker's environment: set it to the absolute path of the checkout "
           "of dbmigrate the flows run from (see docs/PREFECT.md#deploying)"),
    ("", "DBMIGRATE_CHECKOUT is not set in the worker's environment: set it to the absolute path of the checkout "
         "of dbmigrate the flows run from (see docs/PREFECT.md#deploying)"),
    ("dbmigrate", "DBMIGRATE_CHECKOUT=dbmigrate is not an absolute path: set it to the absolute path of the checkout "
                  "of dbmigrate the flows run from"),
    ("/nonexistent/dbmigrate", "DBMIGRATE_CHECKOUT=/nonexistent/dbmigrate: no such directory on this worker"),
    (str(REPO / "flows"), f"DBMIGRATE_CHECKOUT={REPO / 'flows'} is not a checkout of dbmigrate: "
                          "no readable prefect.yaml there"),
])
def test_a_missing_or_wrong_checkout_is_refused_naming_the_variable(value, message, monkeypatch):
    if value is None:
        monkeypatch.delenv("DBMIGRATE_CHECKOUT", raising=False)
    else:
        monkeypatch.setenv("DBMIGRATE_CHECKOUT", value)
    with pytest.raises(ConfigError) as refused:
        checkout()
    assert str(refused.value) == message


def test_another_project_or_a_checkout_without_its_flows_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv("DBMIGRATE_CHECKOUT", str(tmp_path))
    (tmp_path / "prefect.yaml").write_text("name: another-project\ndeployments: []\n")
    with pytest.raises(ConfigError, match="is not a checkout of dbmigrate: its prefect.yaml is not dbmigrate's$"):
        checkout()

    shutil.copy(REPO / "prefect.yaml", tmp_path)
    (tmp_path / "flows").mkdir()
    shutil.copy(REPO / "flows" / "migrate.py", tmp_path / "flows")
    missing = "flows/db_rollback.py, flows/fleet.py, flows/fleet_batch.py, flows/maintenance.py"
    with pytest.raises(ConfigError, match=f"dbmigrate: {missing} missing$"):
        checkout()
