"""The broker matrix: the same fleet, end to end, on every broker people run (issue 19).

On each broker, two real agent processes (dm0.5 on a synthetic camera) and the host CLI:
the agents' topics arrive, ``remote devices`` lists both (and says how it found them),
``remote bench`` (fleet-wide and one device), ``remote deploy --all`` (chunks published ONCE,
on the fleet topic) and ``remote rollback --all`` all answer ``done`` for both.

Brokers: mosquitto 2 (MQTT 5), amqtt (MQTT 3.1.1, in-process), RabbitMQ 3.10's MQTT plugin
(3.1.1; retained messages are not delivered to wildcard subscriptions: discovery relies on the
presence query), and two mosquittos bridged by an MQTT 3.1.1 bridge (agents on one, the host on the
other). What degrades where: docs/brokers.md. Run alone with ``-m brokers``.
"""

from __future__ import annotations

import json
import math
import shutil
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

import paho.mqtt.client as paho
import pytest

from edge_agent.cli import main as cli_main
from edge_agent.comms.broker import AmqttBroker, MosquittoBroker, amqtt_available
from tests.broker import (Recorder, RabbitMqServer, bridged_mosquittos, mosquitto_available,
                          rabbitmq_available)
from tests.data import DM05, DM10
from tests.helpers import start_agent, stop_agent, wait_until, write_config

pytestmark = [pytest.mark.brokers, pytest.mark.broker, pytest.mark.slow]

DEVICES = ("dev-a", "dev-b")
CHUNK = 600_000
# Does the broker deliver retained messages to a wildcard subscription (edge-agent/+/info)?
RETAINED_TO_WILDCARDS = {"mosquitto": True, "amqtt": True, "rabbitmq": False, "bridge": True}


@pytest.fixture(scope="module")
def rabbitmq() -> Iterator[RabbitMqServer]:
    if not rabbitmq_available():
        pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server)")
    # not under pytest's tmp dir: that is private to root, and the server runs as "rabbitmq"
    workdir = Path(tempfile.mkdtemp(prefix="edge-agent-rabbitmq-"))
    server = RabbitMqServer(workdir)
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(workdir, ignore_errors=True)


@pytest.fixture(params=sorted(RETAINED_TO_WILDCARDS))
def site(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Tuple[str, int, int]]:
    """(broker name, the agents' port, the host client's port)."""
    kind = request.param
    if kind in ("mosquitto", "bridge") and not mosquitto_available():
        pytest.skip("mosquitto is not installed")
    if kind == "amqtt" and not amqtt_available():
        pytest.skip("amqtt is not installed")
    if kind == "mosquitto":
        with MosquittoBroker(workdir=str(tmp_path)) as broker:
            yield kind, broker.port, broker.port
    elif kind == "amqtt":
        with AmqttBroker() as broker:
            yield kind, broker.port, broker.port
    elif kind == "rabbitmq":
        server = request.getfixturevalue("rabbitmq")
        yield kind, server.port, server.port
    else:
        a, b = bridged_mosquittos(tmp_path / "bridge")
        try:
            yield kind, a.port, b.port
        finally:
            b.close()
            a.close()


def remote(capsys: pytest.CaptureFixture, port: int, *args: str) -> Tuple[int, str, str]:
    """``edge-agent remote ...`` in-process against the host client's broker."""
    capsys.readouterr()
    rc = cli_main(["remote", *args, "--host", "127.0.0.1", "--port", str(port)])
    out = capsys.readouterr()
    return rc, out.out, out.err


def rows(table: str) -> Dict[str, List[str]]:
    """Device -> its row's cells from a format_table output."""
    return {line.split()[0]: line.split() for line in table.splitlines()[1:] if line.strip()}


def test_fleet_on_broker(site, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    kind, agent_port, client_port = site
    procs = []
    for dev in DEVICES:
        (tmp_path / dev).mkdir()
        config = write_config(tmp_path / dev / "agent.toml", dev, agent_port,
                              {"kind": "synthetic", "width": 320, "height": 240, "fps": 3.0},
                              model={"threads": 1}, publish={"stats_interval_s": 5.0})
        procs.append(start_agent(config))
    rec = Recorder("127.0.0.1", client_port, "edge-agent/dev-a/#", protocol=paho.MQTTv311)
    chunks = Recorder("127.0.0.1", client_port, "edge-agent/+/cmd/deploy/+/chunk/+", protocol=paho.MQTTv311)
    outputs: List[str] = []
    try:
        # the agent's own topics reach a client on this broker
        rec.wait_for("edge-agent/dev-a/result", count=2, timeout=90)
        rec.wait_for("edge-agent/dev-a/mask", count=2, timeout=20)

        # the device list: both devices, found by presence everywhere, by retained state where delivered
        def listed() -> Dict:
            rc, out, _ = remote(capsys, client_port, "devices", "--json", "--discover-s", "3")
            found = json.loads(out) if rc == 0 else {}
            return found if all(found.get(d, {}).get("online") for d in DEVICES) else {}
        found = wait_until(listed, timeout=60, what="both devices listed online", poll_s=0.5)
        for dev in DEVICES:
            assert "presence" in found[dev]["via"], found[dev]["via"]
            assert ("retained" in found[dev]["via"]) == RETAINED_TO_WILDCARDS[kind], (kind, found[dev]["via"])
            assert found[dev]["info"]["device_id"] == dev and found[dev]["info"]["model"]["name"]
        rc, out, err = remote(capsys, client_port, "devices", "--discover-s", "3")
        assert rc == 0 and set(rows(out)) == set(DEVICES), out
        assert "presence query: 2 answered" in err, err

        # remote bench, fleet-wide and one device
        rc, out, err = remote(capsys, client_port, "bench", "--all", "--runs", "3", "--warmup", "0",
                              "--progress", "none", "--timeout", "120")
        assert rc == 0, out + err
        assert {d: r[1] for d, r in rows(out).items()} == {d: "done" for d in DEVICES}, out
        rc, out, err = remote(capsys, client_port, "bench", "-d", "dev-b", "--runs", "2", "--warmup", "0",
                              "--progress", "none", "--timeout", "120")
        assert rc == 0 and list(rows(out)) == ["dev-b"], out + err

        # deploy to the fleet: chunks once, on the fleet topic; then roll back
        rc, out, err = remote(capsys, client_port, "deploy", str(DM10), "--all", "--name", "dm10",
                              "--chunk-size", str(CHUNK), "--timeout", "180")
        assert rc == 0, out + err
        assert {d: r[1:3] for d, r in rows(out).items()} == {d: ["done", "active"] for d in DEVICES}, out
        n_chunks = math.ceil(DM10.stat().st_size / CHUNK)
        wait_until(lambda: len(chunks.messages) >= n_chunks, timeout=10, what="chunks recorded")
        assert sorted({m.topic.split("/")[1] for m in chunks.messages}) == ["all"]
        assert len(chunks.messages) == n_chunks, [m.topic for m in chunks.messages]
        rc, out, err = remote(capsys, client_port, "rollback", "--all", "--timeout", "120")
        assert rc == 0, out + err
        assert {d: r[1:3] for d, r in rows(out).items()} == {d: ["done", "rolled_back"] for d in DEVICES}, out
        rc, out, err = remote(capsys, client_port, "devices", "--json", "--discover-s", "3")
        models = {d: v["info"]["model"]["name"] for d, v in json.loads(out).items()}
        assert models == {d: DM05.stem for d in DEVICES} or all(m != "dm10" for m in models.values()), models
    finally:
        chunks.close()
        rec.close()
        outputs = [stop_agent(p) for p in procs]
    for out in outputs:
        assert "Traceback" not in out, out[-3000:]
