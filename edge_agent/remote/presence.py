"""``cmd/presence``: every agent answers with its ``info``: discovery on any broker.

Fleet discovery reads the retained ``<prefix>/+/availability`` and ``<prefix>/+/info``, but not
every broker delivers retained messages to wildcard subscriptions (RabbitMQ's MQTT plugin does
not), and a cleared retained message hides a device. So the host client also publishes one
``<prefix>/all/cmd/presence`` ``{"request_id": "..."}``; each agent answers ``done`` on
``<prefix>/<device>/presence/<request_id>`` with ``info`` (the document it publishes retained)
and ``online: true``. :meth:`edge_agent.fleet.client.FleetClient.discover` merges both.
"""

from __future__ import annotations

from typing import Any, Dict

from edge_agent.comms.commands import CommandChannel, Schema
from edge_agent.remote.context import HandlerContext, OneCommandHandler

COMMAND = "presence"
KIND = "presence"
MAX_BYTES = 1024
SCHEMA: Schema = {}  # only the request_id


class Presence(OneCommandHandler):
    """Answers ``cmd/presence`` at once (on paho's thread: building info is cheap, answers are queued)."""

    command = COMMAND

    def __init__(self, ctx: HandlerContext) -> None:
        super().__init__(ctx)
        self.channel = CommandChannel(ctx.comms, KIND, SCHEMA, MAX_BYTES)

    def on_message(self, topic: str, payload: bytes, props: Dict[str, Any]) -> None:
        request = self.channel.receive(topic, payload, props)
        if request is not None:
            request.done(online=True, info=self.ctx.info())

    def shutdown(self, reason: str, timeout: float = 2.0) -> None:
        self.channel.outbox.flush(timeout)
