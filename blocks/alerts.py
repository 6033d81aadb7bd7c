"""Alerts of one environment, set up by ``dbmigrate blocks sync`` (:mod:`blocks.sync`): notification
blocks from variables and one Prefect automation per kind of alert, each sending to them.

- ``ALERT_WEBHOOK_URL``: a Custom Webhook block ``<env>-alerts`` POSTing JSON
  ``{"subject", "body", "environment"}``;
- ``ALERT_SLACK_WEBHOOK_URL``: a Custom Webhook block ``<env>-slack-alerts`` POSTing Slack's
  incoming-webhook JSON ``{"text"}``. Not Prefect's SlackWebhook block: that one goes through
  apprise, which only posts to hooks.slack.com, so no listener could check what it sends.

The URL is kept in the block's secrets (the ``url`` field only references it): it holds the
webhook's token, and the UI and API show a secret obscured. Without either variable the
environment has no alerts (sync says so) and automations an earlier sync made are left alone.

The automations (:data:`KINDS`): the events the flows emit (:mod:`flows.alerts`) for the
environment's resource, and Prefect's own ``prefect.flow-run.Crashed`` for runs tagged with the
environment (every deployment of prefect.yaml is, and every run tags itself): a killed
process emits nothing. Each is found again by name: a second sync updates or leaves it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from prefect.client.orchestration import get_client
from prefect.events.actions import SendNotification
from prefect.events.schemas.automations import AutomationCore, EventTrigger, Posture

from dbmigrate.errors import ConfigError

VARIABLES = ("ALERT_WEBHOOK_URL", "ALERT_SLACK_WEBHOOK_URL")
CRASHED = "prefect.flow-run.Crashed"

# The body of every alert: what the flows' events carry (flows/alerts.py), one line each.
BODY = """{{ event.payload.flow_run }} ({{ event.payload.flow }})
Environment: {{ event.payload.environment }}
Revisions: {{ event.payload.revisions }}
Phase: {{ event.payload.phase }}
Reason: {{ event.payload.reason }}
Run: {{ event.payload.flow_run_url }}"""
# A crashed run emitted nothing of its own: the run's parameters and final state say what is known
# (flows.recovery ends a run that held the environment with where the database is).
CRASHED_BODY = """{% set message = flow_run.state.message or "" %}{{ flow_run.name }} ({{ flow.name }})
Environment: <environment>
Revisions: to {{ flow_run.parameters.get("target_revision") or flow_run.parameters.get("to_revision") or flow_run.parameters.get("backup_id") or ("head" if flow.name == "db-migrate" else "-") }}
Phase: {{ message.split(" during ")[1].split(":")[0] if " during " in message else "unknown (the process died)" }}
Reason: {{ message }}
Run: {{ flow_run|ui_url }}"""


@dataclass(frozen=True)
class Kind:
    """One automation: its name's tail (the notification's subject) and the event that fires it."""

    title: str
    event: str


KINDS = (
    Kind("run failed", "dbmigrate.run.failed"),
    Kind("run crashed", CRASHED),
    Kind("rolled back", "dbmigrate.run.rolled-back"),
    Kind("waiting for approval", "dbmigrate.approval.waiting"),
    Kind("drift found", "dbmigrate.drift.found"),
)


def resource_id(environment: str) -> str:
    """The resource the flows' events of ``environment`` concern (flows/alerts.py)."""
    return f"dbmigrate.environment.{environment}"


def automation_name(environment: str, kind: Kind) -> str:
    return f"dbmigrate {environment}: {kind.title}"


def wanted_blocks(environment: str, given: Mapping[str, str]) -> list[tuple[str, dict]]:
    """(block name, fields) of each notification block the variables ask for."""
    subject = "dbmigrate {{subject}}"
    shapes = {
        "ALERT_WEBHOOK_URL": (f"{environment}-alerts",
                              {"subject": subject, "body": "{{body}}", "environment": environment}),
        "ALERT_SLACK_WEBHOOK_URL": (f"{environment}-slack-alerts", {"text": f"*{subject}*\n{{{{body}}}}"}),
    }
    for variable in VARIABLES:
        if variable in given and not given[variable].startswith(("https://", "http://")):
            raise ConfigError(f"{variable}: not an http(s) URL")
    return [(name, {"name": name, "url": "{{url}}", "json_data": json, "secrets": {"url": given[variable]}})
            for variable, (name, json) in shapes.items() if variable in given]


def automations(environment: str, block_ids: list) -> list[AutomationCore]:
    """The environment's automations, each notifying every block in ``block_ids``."""
    out = []
    for kind in KINDS:
        if kind.event == CRASHED:
            trigger = EventTrigger(expect={kind.event}, match={"prefect.resource.id": "prefect.flow-run.*"},
                                   match_related={"prefect.resource.role": "tag",
                                                  "prefect.resource.id": f"prefect.tag.{environment}"},
                                   posture=Posture.Reactive, threshold=1)
            body = CRASHED_BODY.replace("<environment>", environment)
        else:
            trigger = EventTrigger(expect={kind.event}, match={"prefect.resource.id": resource_id(environment)},
                                   posture=Posture.Reactive, threshold=1)
            body = BODY
        out.append(AutomationCore(
            name=automation_name(environment, kind),
            description=f"{environment}: {kind.title}, sent to the environment's alert blocks (dbmigrate blocks sync)",
            trigger=trigger,
            actions=[SendNotification(block_document_id=block_id, subject=f"{environment}: {kind.title}", body=body)
                     for block_id in block_ids],
        ))
    return out


def sync_automations(environment: str, block_ids: list) -> list[tuple[str, str]]:
    """Create, update or leave each automation; (name, action) for each. Duplicates of a name
    (two syncs at once) are deleted: one automation per kind."""
    results = []
    with get_client(sync_client=True) as client:
        for wanted in automations(environment, block_ids):
            existing = client.read_automations_by_name(wanted.name)
            for duplicate in existing[1:]:
                client.delete_automation(duplicate.id)
            if not existing:
                client.create_automation(wanted)
                results.append((wanted.name, "created"))
            elif _shape(existing[0]) == _shape(wanted):
                results.append((wanted.name, "unchanged"))
            else:
                client.update_automation(existing[0].id, wanted)
                results.append((wanted.name, "updated"))
    return results


def _shape(automation: AutomationCore) -> dict:
    """What sync sets, to compare: the trigger without its generated id."""
    fields = set(AutomationCore.model_fields) - {"tags", "owner_resource"}
    data = automation.model_dump(mode="json", include=fields)
    data["trigger"].pop("id", None)
    return data

