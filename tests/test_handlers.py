"""Command handlers come from one explicit table handed to the Agent: a handler in the table gets
its commands over a real broker, sees only its narrow context, sets nothing on the agent, and
gets its final answers out before the comms stop."""

from __future__ import annotations

import json
import threading
from typing import Any, Dict, List

import pytest

from edge_agent.config import load_config
from edge_agent.daemon.agent import Agent
from edge_agent.remote import HANDLERS
from edge_agent.remote.context import HandlerContext, Route
from tests.broker import Recorder
from tests.data import DM05

PREFIX = "edge-agent"


class EchoHandler:
    """A test handler in its own table: answers ``cmd/echo`` on ``echo`` and says bye on shutdown."""

    instances: List["EchoHandler"] = []

    def __init__(self, ctx: HandlerContext) -> None:
        self.ctx = ctx
        self.received: List[bytes] = []
        EchoHandler.instances.append(self)

    def routes(self):
        return [Route("echo", self.on_echo)]

    def on_echo(self, topic: str, payload: bytes, props: Dict[str, Any]) -> None:
        self.received.append(payload)
        self.ctx.comms().publish("echo", json.dumps({"got": payload.decode(),
                                                     "model": self.ctx.models.running_sha()}).encode())

    def info(self, doc: Dict[str, Any]) -> Dict[str, Any]:
        doc["echo"] = {"received": len(self.received)}
        return doc

    def shutdown(self, reason: str) -> None:
        self.ctx.comms().publish("echo", json.dumps({"bye": reason}).encode(), qos=1)


@pytest.mark.broker
def test_a_handler_in_the_table_receives_its_command(mosquitto, tmp_path):
    broker = mosquitto()
    cfg = load_config(None, ["agent.device_id=tbl-1", "source.kind=synthetic", "source.fps=10",
                             f"model.path={DM05}", f"mqtt.port={broker.port}", "mqtt.host=127.0.0.1",
                             f"agent.state_dir={tmp_path}"], env={})
    EchoHandler.instances.clear()
    agent = Agent(cfg, install_signals=False, handlers={"echo": EchoHandler})
    before = set(vars(agent))
    rec = Recorder("127.0.0.1", broker.port)
    runner = threading.Thread(target=agent.run, daemon=True)
    runner.start()
    try:
        rec.wait_for(f"{PREFIX}/tbl-1/mask", timeout=30)
        info = json.loads(rec.wait_for(f"{PREFIX}/tbl-1/info", timeout=10)[-1].payload)
        assert info["echo"] == {"received": 0} and "deploy" not in info  # only the table's handlers
        rec.publish(f"{PREFIX}/tbl-1/cmd/echo", b"hello")
        rec.publish(f"{PREFIX}/all/cmd/echo", b"fleet")
        answers = [json.loads(m.payload) for m in rec.wait_for(f"{PREFIX}/tbl-1/echo", count=2, timeout=10)]
        assert {a["got"] for a in answers} == {"hello", "fleet"}
        assert answers[0]["model"] == agent.segmenter.model.file.sha256
        rec.publish(f"{PREFIX}/tbl-1/cmd/benchmark", b'{"request_id":"b1"}')  # not in this table
    finally:
        agent.request_stop()
        runner.join(20)
    (handler,) = EchoHandler.instances
    assert handler.received == [b"hello", b"fleet"] and agent.handlers == {"echo": handler}
    assert set(vars(agent)) == before  # nothing was patched onto the agent
    bye = [json.loads(m.payload) for m in rec.wait_for(f"{PREFIX}/tbl-1/echo", count=3, timeout=10)]
    assert bye[-1] == {"bye": "agent stopping"}  # sent by shutdown, before the comms stopped
    assert not rec.matching(f"{PREFIX}/tbl-1/benchmark/b1")
    rec.close()


def test_the_default_table_serves_bench_and_deploy(tmp_path):
    cfg = load_config(None, ["mqtt.enabled=false", f"model.path={DM05}", f"agent.state_dir={tmp_path}"], env={})
    agent = Agent(cfg, install_signals=False)  # the default table: edge_agent.remote.HANDLERS
    assert agent.models.open_store() is not None
    agent.start_handlers()
    assert set(agent.handlers) == set(HANDLERS) == {"benchmark", "deploy", "presence"}
    commands = {name: {(r.command, r.subtree) for r in h.routes()} for name, h in agent.handlers.items()}
    assert commands == {"benchmark": {("benchmark", False)},
                        "deploy": {("deploy", True), ("rollback", False), ("models", False)},
                        "presence": {("presence", False)}}
    assert agent.info()["deploy"] == {"current": None, "previous": None, "pending": None, "signing": "off"}
    for handler in agent.handlers.values():
        handler.shutdown("test over")  # idle handlers stop at once


def test_a_table_factory_may_decline(tmp_path):
    """A factory may return None (declined); the deploy handler does not decline without a usable
    store: it stays to answer every deployment ``rejected`` with the reason."""
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    cfg = load_config(None, ["mqtt.enabled=false", f"model.path={DM05}", f"agent.state_dir={blocker}"], env={})
    agent = Agent(cfg, install_signals=False, handlers={**HANDLERS, "declines": lambda ctx: None})
    assert agent.models.open_store() is None and "agent.state_dir" in agent.models.store_problem
    assert str(tmp_path) not in agent.models.store_problem  # published: no local path
    agent.start_handlers()
    assert set(agent.handlers) == {"benchmark", "deploy", "presence"}
