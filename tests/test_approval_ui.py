"""Approval as the approver sees it: a production db-migrate run from the deployment,
on a real `prefect server start` and a process worker, paused for approval and answered
in the Prefect UI in headless Chromium (tests/support/browser.py), once in each of Prefect's UIs.

What is checked is what a person sees: the paused run's state message, the form's fields
(required or not), its text (the revision reached, each revision, the SQL, nothing cut
off), then what the answer did: the database, the run's final state, the log line naming
who answered, the report's approval and the summary artifact. Screenshots of each step
are left in tests/support/browser.SCREENSHOTS (``screenshots/`` by default) for a reviewer."""

from __future__ import annotations

import json
import socket

import pytest

from tests.support.browser import SCREENSHOTS, approve_in_ui, require_browser, show_artifact
from tests.support.helpers import SAMPLE_CONFIG, fingerprint_of, reports_in, sample_at, save_environment, wait_until
from tests.support.prefect_server import PrefectServer, deployed, final, flow_run, run_log, start_run, working

# Its own Prefect server and a browser: one worker runs the module (--dist loadgroup).
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("prefect-server-approval-ui")]

WAITING = ("waiting for approval of 0004 → 0006 in production: click Resume on this run in the Prefect UI, "
           "choose approve or reject, give your name")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    require_browser()
    with deployed(PrefectServer(tmp_path_factory.mktemp("prefect-home"))) as server:
        yield server


@pytest.fixture
def worker(server, tmp_path):
    with working(server, tmp_path) as worker:
        yield worker


@pytest.fixture
def paused(server, worker, target, pg_cluster, tmp_path):
    """A production run of the sample project from 0004 (to head, 0006), paused for approval."""
    sample_at(pg_cluster, "0004", target.database)
    environment = save_environment(target, "production", approval_poll_s=1)
    run_id = start_run(server, environment, str(SAMPLE_CONFIG))
    wait_until(lambda: flow_run(run_id).state.is_paused(), 120, "the run to pause for approval")
    yield run_id
    if not flow_run(run_id).state.is_final():  # a failed test leaves no paused run holding production's slot
        from prefect.client.orchestration import get_client
        from prefect.states import Cancelled

        with get_client(sync_client=True) as client:
            client.set_flow_run_state(run_id, Cancelled(message="the test ended with the run paused"), force=True)


def ui_address(server: PrefectServer) -> str:
    return server.api_url.removesuffix("/api")


def logs_say(run_id: str, *messages: str) -> bool:
    """The run's log holds these lines (once the flow-run process has sent its last logs)."""
    return wait_until(lambda: set(messages) <= {line.split(" ", 1)[1] for line in run_log(run_id).splitlines()}, 30,
                    f"the log lines {messages}")


def report_of(tmp_path) -> dict:
    """The worker's report of the run (its DBMIGRATE_HOME is tests.support.prefect_server.working's)."""
    [report] = reports_in(tmp_path / "worker-home")
    return json.loads(report.read_text())


def test_approved_in_the_browser(server, paused, target, tmp_path):
    seen = approve_in_ui(ui_address(server), paused, "Alice Ops", "CHG-42", ui="v1", name="approve")

    assert seen.state_message == WAITING
    assert seen.fields == ["Decision", "Approver", "Comment (Optional)"], "decision and name are required"
    assert seen.text.startswith("Approve migration of production: 0004 → 0006\n"), seen.text
    assert "0005 store costs as integer cents (data migration)" in seen.text
    assert "0006 indexes for cost reports and the open-recommendations view" in seen.text
    assert not seen.clipped, f"cut off in the form: {seen.clipped}"
    assert ("0006 excepted require-concurrent-index-creation (2 finding(s)): small tables: the build blocks writes "
            "for milliseconds") in seen.text, "the lint's reviewed exceptions"
    assert "CREATE INDEX ix_recommendations_open ON" in seen.text and "COMMIT;" in seen.text, "the SQL"

    run = final(paused, 120)
    assert run.state.is_completed(), run_log(paused)
    assert fingerprint_of(target).revisions == ("0006",)
    assert logs_say(paused, WAITING, "approved by Alice Ops: CHG-42")
    report = report_of(tmp_path)
    assert report["approval"] == {"approved": True, "approver": "Alice Ops", "via": "prefect-ui", "comment": "CHG-42"}

    summary = show_artifact(ui_address(server), paused, "db-migrate-production", name="approve-summary")
    backup = report["backup"]
    assert backup["location"].startswith("/"), "an absolute path on the worker"
    assert (f"backup {backup['id']} at {_host()}:{backup['location']}, {backup['size_bytes']} bytes, "
            "checksum and pg_restore --list checked") in summary.text
    assert f"stored at {_host()}:{reports_in(tmp_path / 'worker-home')[0]}" in summary.text
    assert summary.links["db-migrate-production-report"] == (
        f"{ui_address(server)}/artifacts/key/db-migrate-production-report")
    assert "approval approved by Alice Ops (prefect-ui): CHG-42" in summary.text and not summary.clipped
    print(f"\nscreenshots: {', '.join(str(p.relative_to(SCREENSHOTS)) for p in seen.screenshots)}, "
          f"{summary.screenshot.name} in {SCREENSHOTS}")


def test_rejected_in_the_browser_changes_nothing(server, paused, target, tmp_path):
    from prefect.flow_runs import resume_flow_run

    before = fingerprint_of(target)
    with pytest.raises(RuntimeError, match="'decision' is a required property"):  # the server refuses it
        resume_flow_run(paused, run_input={"approver": "Mallory"})
    assert flow_run(paused).state.is_paused()

    seen = approve_in_ui(ui_address(server), paused, "Bob", "not in the change window", decision="reject", ui="v2",
                         name="reject")
    assert seen.state_message == WAITING and not seen.clipped
    assert seen.fields == ["Decision", "Approver", "Comment (Optional)"]

    run = final(paused, 120)
    assert run.state.is_failed()
    assert run.state.message == "approval failed: not approved by Bob: nothing was changed"
    assert fingerprint_of(target) == before
    assert logs_say(paused, WAITING, "rejected by Bob: not in the change window")
    report = report_of(tmp_path)
    assert report["approval"] == {"approved": False, "approver": "Bob", "via": "prefect-ui",
                                  "comment": "not in the change window"}
    assert report["error"]["phase"] == "approval"
    assert report["backup"]["id"] == report["rehearsal"]["backup_id"], "production's backup came before, rehearsed"


def _host() -> str:
    return socket.gethostname()
