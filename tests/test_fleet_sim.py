"""The device simulator (bench/fleet_sim.py) speaks the agent's protocol: its payloads pass the same
closed-world asyncapi validation as a real agent's, and a staged rollout over simulated devices
fails its fps gate at stage 2 and rolls back the devices of stages 1 and 2 (a real mosquitto).

The simulated cost makes the gate fail for the same reason as with real agents
(tests/test_rollout.py): paced devices (2 fps) keep up with either model, the unpaced device of
stage 2 runs as fast as the model lets it, and the new model costs 10x the inference time.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from bench.fleet_sim import Costs, FleetSim, fake_model_bytes
from edge_agent.cli import main as cli_main
from edge_agent.config import MqttConfig
from edge_agent.fleet.bench import command_params
from edge_agent.fleet.client import FleetClient
from edge_agent.fleet.deploy import deploy, deploy_params
from tests.broker import Recorder, bridged_mosquittos, mosquitto_available
from tests.helpers import wait_until
from tests.asyncapi_check import PREFIX, check_message, final_info_then_offline, validator

PRESENCE = validator("presence")

SLOW = fake_model_bytes("slow-model")
SLOW_SHA = hashlib.sha256(SLOW).hexdigest()


@pytest.mark.broker
@pytest.mark.slow
def test_simulated_devices_publish_what_the_asyncapi_documents(mosquitto, tmp_path: Path):
    broker = mosquitto()
    rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/#")
    sim = FleetSim(3, tmp_path / "sim", port=broker.port, costs=Costs({SLOW_SHA: 80.0}, fps=5.0),
                   tags=lambda i: ["site-a"], overrides=["publish.timings_interval_s=0.5",
                                                         "publish.stats_interval_s=0.5"]).start()
    client = FleetClient(MqttConfig(host="127.0.0.1", port=broker.port))
    dev = sim.ids[0]
    try:
        assert sim.wait_connected(30) == 3
        client.connect()
        found = client.discover(1.0)
        assert {d for d, v in found.items() if v.online and set(v.via) == {"retained", "presence"}} == set(sim.ids)
        assert found[dev].info["tags"] == ["site-a"]
        bench = client.request("benchmark", command_params(runs=3, warmup=1), devices=[dev], timeout=30)
        assert bench[dev].status == "done", bench
        assert client.request("benchmark", {"runs": 0}, devices=[dev], timeout=20)[dev].status == "rejected"
        rec.publish(f"{PREFIX}/{dev}/cmd/benchmark", b"not json")  # rejected on benchmark/_invalid
        done = deploy(client, deploy_params(SLOW, "slow", chunk_size=4096, confirm_frames=2), SLOW,
                      devices=[dev], timeout=60)
        assert done[dev].status == "done" and done[dev].final["state"] == "active", done[dev]
        assert sim.running()[dev] == SLOW_SHA
        # the swap changes what the device reports: the cost of the new model
        wait_until(lambda: any(json.loads(m.payload).get("stages", {}).get("inference", {}).get("p50", 0) > 60
                               for m in rec.matching(f"{PREFIX}/{dev}/timings")), 20, "p50 of the slow model")
        models = client.request("models", {}, devices=[dev], timeout=20)
        assert models[dev].status == "done" and len(models[dev].final["models"]) == 2
        back = client.request("rollback", {"confirm_frames": 2}, devices=[dev], kind="deploy", timeout=60)
        assert back[dev].final["state"] == "rolled_back", back[dev]
        assert client.request("rollback", {"to": "no-such-model"}, devices=[dev], kind="deploy",
                              timeout=20)[dev].status == "rejected"
        rec.wait_for(f"{PREFIX}/{dev}/benchmark/_invalid", timeout=10)
        rec.wait_for(f"{PREFIX}/{dev}/stats", count=3, timeout=20)
        rec.wait_for(f"{PREFIX}/{dev}/result", count=3, timeout=20)
    finally:
        client.close()
        sim.stop()
    for d in sim.ids:
        rec.wait_for(f"{PREFIX}/{d}/availability", b"offline", timeout=20)
    rec.close()
    seen = set()
    for m in list(rec.messages):
        device = m.topic.split("/")[1]
        if device not in sim.ids or m.topic.startswith(f"{PREFIX}/{device}/cmd/"):
            continue
        if m.topic.startswith(f"{PREFIX}/{device}/presence/"):  # the real agent's test does not query it
            errors = list(PRESENCE.iter_errors(json.loads(m.payload)))
            assert not errors, f"{m.topic}: {errors[0].message}"
            seen.add("presence")
        else:
            seen.add(check_message(device, m.topic, bytes(m.payload)))
    assert seen == {"availability", "info", "result", "timingsInterval", "stats", "benchmarkResult",
                    "deployStatus", "modelsList", "presence"}, seen
    for d in sim.ids:
        final_info_then_offline(rec, d)


@pytest.mark.broker
@pytest.mark.slow
def test_a_rollout_over_simulated_devices_fails_at_stage_2_and_rolls_back_stages_1_and_2(mosquitto, tmp_path,
                                                                                         capsys):
    broker = mosquitto()
    costs = Costs({SLOW_SHA: 400.0}, default_ms=40.0, fps=2.0, device_fps={"sim-0002": 0.0})
    sim = FleetSim(10, tmp_path / "sim", port=broker.port, costs=costs, tags=lambda i: ["site-a"],
                   overrides=["publish.timings_interval_s=1", "publish.stats_interval_s=1"]).start()
    model = tmp_path / "slow.tflite"
    model.write_bytes(SLOW)
    state = tmp_path / "rollout.json"
    try:
        assert sim.wait_connected(30) == 10
        base_sha = sim.running()["sim-0000"]
        rc = cli_main(["remote", "rollout", str(model), "--group", "site-a", "--stages", "1,3,100%",
                       "--soak-s", "4", "--baseline-s", "3", "--fps-ratio", "0.8", "--p50-ratio", "0",
                       "--state", str(state), "--timeout", "60", "--host", "127.0.0.1",
                       "--port", str(broker.port), "--discover-s", "1"])
        out = capsys.readouterr().out
        assert rc == 1, out
        doc = json.loads(state.read_text())
        assert doc["status"] == "failed"
        assert [s["devices"] for s in doc["stages"]] == [["sim-0000"], ["sim-0001", "sim-0002"],
                                                          [f"sim-{i:04d}" for i in range(3, 10)]]
        assert [s["status"] for s in doc["stages"]] == ["passed", "failed", "pending"], doc["stages"]
        failed = doc["stages"][1]["results"]
        assert failed["sim-0001"]["ok"] and failed["sim-0002"]["failed"][0].startswith("fps: "), failed
        assert "stage 2/3: sim-0002 failed fps:" in out
        assert doc["rolled_back"] == {"sim-0000": "done", "sim-0001": "done", "sim-0002": "done"}
        assert sim.running() == {d: base_sha for d in sim.ids}
        untouched = [d for d in sim.devices if d.config.agent.device_id >= "sim-0003"]
        assert all(not d.models.store.has(SLOW_SHA) for d in untouched)  # stage 3 never got the model
    finally:
        sim.stop()


@pytest.mark.broker
@pytest.mark.slow
def test_a_fleet_wide_benchmark_of_300_simulated_devices_gets_every_answer(mosquitto, tmp_path):
    """300 devices answer at once (accepted, progress, done: ~1,800 messages in a burst, more than
    mosquitto queues for one QoS 1 subscriber by default): every device's final answer arrives."""
    broker = mosquitto()
    sim = FleetSim(300, tmp_path / "sim", port=broker.port, costs=Costs(fps=0.2)).start()
    client = FleetClient(MqttConfig(host="127.0.0.1", port=broker.port))
    seen = []
    try:
        assert sim.wait_connected(60) == 300
        client.connect()
        assert sum(1 for d in client.discover(2.0).values() if d.online) == 300
        answers = client.request("benchmark", command_params(runs=5, warmup=1), fleet=True, timeout=60,
                                 on_message=lambda dev, doc: seen.append((dev, doc["status"])))
        assert sorted(d for d, a in answers.items() if a.status == "done") == sim.ids, \
            {a.status: a.reason for a in answers.values() if a.status != "done"}
        assert all(len(a.final["result"]["samples_ms"]) == 5 for a in answers.values())
        assert {dev for dev, status in seen if status == "accepted"} == set(sim.ids)
    finally:
        client.close()
        sim.stop()


@pytest.mark.broker
@pytest.mark.slow
def test_simulated_devices_reconnect_on_the_shared_loop_after_the_broker_was_away(mosquitto, tmp_path):
    """Every paho client runs on the simulator's one network loop: a broker stop drops every
    connection, and each device connects again (the agent's MqttConnection policy) once it is back."""
    broker = mosquitto()
    sim = FleetSim(20, tmp_path / "sim", port=broker.port, costs=Costs(fps=1.0)).start()
    try:
        assert sim.wait_connected(30) == 20
        broker.stop()
        wait_until(lambda: sim.connected() == 0, 30, "every device sees the broker go")
        broker.start()
        assert sim.wait_connected(60) == 20
        assert sim.net.reconnects > 20
        client = FleetClient(MqttConfig(host="127.0.0.1", port=broker.port))
        try:
            client.connect()
            answers = client.request("benchmark", command_params(runs=2, warmup=0), fleet=True, timeout=30)
            assert sorted(d for d, a in answers.items() if a.status == "done") == sim.ids, answers
        finally:
            client.close()
    finally:
        sim.stop()


@pytest.mark.broker
@pytest.mark.slow
def test_a_fleet_wide_answer_burst_crosses_a_bridge_bigger_than_the_site_brokers_queue(tmp_path):
    """Devices on a site mosquitto, the fleet client on a central one bridged to it (QoS 1, as in
    docs/brokers.md). The bridge is one QoS 1 subscriber at the site broker: 100 devices' answers
    (~600 messages at once) overflow a 50-message queue there (the default 1,000 overflows so at
    1,000 devices) unless the site broker does not cap messages in flight (docs/brokers.md,
    "Bridges at scale"): every answer crosses, and the site broker dropped nothing ($SYS)."""
    if not mosquitto_available():
        pytest.skip("mosquitto is not installed")
    from bench.fleet_sim_scale import SysDropped, wait_bridge

    site, central = bridged_mosquittos(tmp_path / "bridge", qos=1, site_conf=[
        "sys_interval 1", "max_queued_messages 50", "max_inflight_messages 0"])
    sim = client = None
    drops = SysDropped(site.port)
    try:
        wait_bridge(site.port, central.port)
        sim = FleetSim(100, tmp_path / "sim", port=site.port, costs=Costs(fps=0.2)).start()
        assert sim.wait_connected(60) == 100
        client = FleetClient(MqttConfig(host="127.0.0.1", port=central.port))
        client.connect()
        assert sum(1 for d in client.discover(2.0).values() if d.online) == 100
        answers = client.request("benchmark", command_params(runs=5, warmup=1), fleet=True, timeout=60)
        assert sorted(d for d, a in answers.items() if a.status == "done") == sim.ids, \
            {a.status: a.reason for a in answers.values() if a.status != "done"}
        assert drops.wait(20) == 0  # after two more $SYS updates: a drop would be counted by now
    finally:
        drops.close()
        if client is not None:
            client.close()
        if sim is not None:
            sim.stop()
        central.close()
        site.close()
