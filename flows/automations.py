"""The Prefect automation that tells the team when the nightly evaluation fails, declared in code and created (or
updated) by ``vitflow deploy``. It notifies through a notification block the user configures once, e.g. a webhook:

    from prefect.blocks.notifications import CustomWebhookNotificationBlock
    CustomWebhookNotificationBlock(name="nightly", url="https://hooks.example/...",
                                   json_data={"text": "{{subject}}: {{body}}"}).save("nightly-alerts")
    export VITFLOW_NOTIFY_BLOCK=custom-webhook/nightly-alerts

The server's triggers service evaluates the automation (``PREFECT_SERVER_SERVICES_TRIGGERS_ENABLED``, on by default).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from uuid import UUID

NIGHTLY_DEPLOYMENT = "transfer-eval-nightly"
AUTOMATION_NAME = "vitflow: nightly transfer evaluation failed"
NOTIFY_BLOCK_ENV = "VITFLOW_NOTIFY_BLOCK"


def nightly_failure_automation(block_document_id: UUID):
    """Notify once per flow run of the nightly deployment that ends Failed or Crashed."""
    from prefect.automations import Automation, EventTrigger, Posture
    from prefect.events.actions import SendNotification

    return Automation(
        name=AUTOMATION_NAME,
        description=f"Sends the failure of a {NIGHTLY_DEPLOYMENT} flow run to the configured notification block.",
        trigger=EventTrigger(
            expect={"prefect.flow-run.Failed", "prefect.flow-run.Crashed"},
            match_related={"prefect.resource.role": "deployment", "prefect.resource.name": NIGHTLY_DEPLOYMENT},
            posture=Posture.Reactive,
            threshold=1,
        ),
        actions=[
            SendNotification(
                block_document_id=block_document_id,
                subject="vitflow nightly failed: {{ flow_run.name }}",
                body="{{ deployment.name }} run {{ flow_run.name }} ended {{ flow_run.state.name }}: "
                "{{ flow_run.state.message }}\n{{ flow_run|ui_url }}",
            )
        ],
    )


def ensure_nightly_notification(block: str | None = None, on_message: Callable[[str], None] = print) -> str | None:
    """Create or update the automation for the notification block ``block`` (``<block-type>/<name>``, default
    ``$VITFLOW_NOTIFY_BLOCK``); returns the automation's id, or None (and says so) when no block is configured."""
    from prefect.automations import Automation
    from prefect.blocks.core import Block
    from prefect.blocks.notifications import NotificationBlock  # registers the notification block types

    block = block or os.environ.get(NOTIFY_BLOCK_ENV)
    if not block:
        on_message(f"no notification on failed nightly runs: set {NOTIFY_BLOCK_ENV}=<block-type>/<block-name>")
        return None
    notifier = Block.load(block)
    if not isinstance(notifier, NotificationBlock):
        raise ValueError(f"{NOTIFY_BLOCK_ENV}={block!r} is not a notification block")
    wanted = nightly_failure_automation(notifier._block_document_id)
    try:
        existing = Automation.read(name=AUTOMATION_NAME)
    except ValueError:  # not created yet
        automation = wanted.create()
    else:
        automation = wanted.model_copy(update={"id": existing.id})
        automation.update()
    on_message(f"failed nightly runs notify {block} (automation {automation.id})")
    return str(automation.id)
