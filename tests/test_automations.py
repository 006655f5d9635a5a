"""The failure-notification automation `vitflow deploy` declares, on Prefect's test harness (a real temporary
server): created once, updated in place on the next deploy, and skipped, saying so, without a notification block.
That it fires and reaches a webhook is tests/test_nightly.py (a `prefect server` with its triggers service)."""

from __future__ import annotations

from flows.automations import AUTOMATION_NAME, NIGHTLY_DEPLOYMENT, ensure_nightly_notification


def test_deploy_creates_the_nightly_automation_once_and_updates_it(monkeypatch):
    from prefect.automations import Automation
    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    from prefect.client.orchestration import get_client
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        said: list[str] = []
        monkeypatch.delenv("VITFLOW_NOTIFY_BLOCK", raising=False)
        assert ensure_nightly_notification(on_message=said.append) is None
        assert said == ["no notification on failed nightly runs: set VITFLOW_NOTIFY_BLOCK=<block-type>/<block-name>"]

        CustomWebhookNotificationBlock(name="team", url="http://127.0.0.1:9/hook").save("team-hook")
        monkeypatch.setenv("VITFLOW_NOTIFY_BLOCK", "custom-webhook/team-hook")
        first = ensure_nightly_notification(on_message=said.append)
        second = ensure_nightly_notification(on_message=said.append)
        assert (
            first == second and said[-1] == f"failed nightly runs notify custom-webhook/team-hook (automation {first})"
        )
        with get_client(sync_client=True) as client:
            (stored,) = client.read_automations_by_name(AUTOMATION_NAME)
        assert str(stored.id) == first
        assert stored.trigger.expect == {"prefect.flow-run.Failed", "prefect.flow-run.Crashed"}
        assert stored.trigger.match_related.get("prefect.resource.name") == [NIGHTLY_DEPLOYMENT]
        (action,) = Automation.read(name=AUTOMATION_NAME).actions
        assert action.type == "send-notification"
