"""Groups and staged rollouts: real agents (subprocesses) on a real mosquitto.

The rollout test makes the second stage fail the fps gate for a real reason: device ``ro-a`` is
paced at 2 fps (any of the two models keeps up), device ``ro-b`` reads its folder as fast as it
can, so the depth-1.0 model (about 3x the inference work of depth 0.5) lowers its fps by far more
than the gate allows. Stage 1 (ro-a) passes, stage 2 (ro-b) fails, both go back to depth 0.5.
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import List

import pytest

from edge_agent.cli import main as cli_main
from edge_agent.fleet.client import Answer
from edge_agent.fleet.deploy import deploy_params
from edge_agent.fleet.rollout import Gates, Rollout, RolloutError, RolloutState, check_gates, parse_stages
from tests.data import DM10
from tests.helpers import wait_until
from tests.rollout_agents import SHA05, _running, two_agents

SHA10 = hashlib.sha256(DM10.read_bytes()).hexdigest()


def test_stages_are_cumulative_counts_or_percentages():
    assert parse_stages("1,10,50%,100%", 40) == [1, 10, 20, 40]
    assert parse_stages("1,100%", 1) == [1]
    assert parse_stages("25%,100%", 3) == [1, 3]
    assert parse_stages("1,10,50%,100%", 3) == [1, 3]  # stages that add no device here are merged
    for bad, why in (("1,1,100%", "adds none"), ("1,2", "end with 100%"), ("x,100%", "neither"),
                     ("0,100%", "adds none")):
        with pytest.raises(RolloutError, match=why):
            parse_stages(bad, 5)


def test_gates_name_what_failed_and_by_how_much():
    gates = Gates(fps_ratio=0.8, p50_ratio=1.2)
    ok = Answer("d", "done")
    passed = check_gates(gates, {"fps": 10, "p50_ms": 50}, {"fps": 9, "p50_ms": 55}, ok, "running")
    assert passed["ok"] and passed["failed"] == []
    slow = check_gates(gates, {"fps": 10, "p50_ms": 50}, {"fps": 4, "p50_ms": 150}, ok, "running")
    assert slow["failed"] == ["fps: 4 after vs 10 before = 0.40x < 0.8x",
                              "p50: 150 ms after vs 50 ms before = 3.00x > 1.2x"]
    refused = check_gates(gates, {"fps": 10}, {"fps": 10}, Answer("d", "failed", "sanity check failed"), "running")
    assert refused["failed"] == ["deploy: failed (sanity check failed)"]
    assert check_gates(Gates(None, None), {}, {}, ok, "error")["failed"] == [
        "status: the device reports an error after the swap"]


@pytest.fixture
def fleet(mosquitto, tmp_path):
    broker = mosquitto()
    with two_agents(tmp_path, broker.port) as (client, configs):
        yield broker, client, configs


@pytest.mark.broker
@pytest.mark.slow
def test_groups_select_devices_and_a_failing_stage_rolls_back_every_device_it_changed(fleet, tmp_path, capsys):
    broker, client, _ = fleet
    base = ["--host", "127.0.0.1", "--port", str(broker.port), "--discover-s", "1"]
    # groups: published in info, shown by `remote devices`, selected by --group
    assert cli_main(["remote", "devices", "--json", *base]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["ro-a"]["info"]["tags"] == ["site-a", "door"] and listed["ro-b"]["info"]["tags"] == ["site-a"]
    assert cli_main(["remote", "models", "--group", "door", *base]) == 0
    captured = capsys.readouterr()
    assert "group door: ro-a" in captured.err and "ro-b" not in captured.out
    assert cli_main(["remote", "models", "--group", "nowhere", *base]) == 2
    assert "no device online in group 'nowhere' (groups seen: door, site-a" in capsys.readouterr().err
    assert _running(client) == {"ro-a": SHA05, "ro-b": SHA05}

    state = tmp_path / "rollout.json"
    rc = cli_main(["remote", "rollout", str(DM10), "--group", "site-a", "--stages", "1,100%", "--soak-s", "6",
                   "--baseline-s", "5", "--fps-ratio", "0.8", "--p50-ratio", "0", "--state", str(state),
                   "--timeout", "120", *base])
    out = capsys.readouterr().out
    assert rc == 1, out
    doc = json.loads(state.read_text())
    assert doc["status"] == "failed", doc
    assert [s["devices"] for s in doc["stages"]] == [["ro-a"], ["ro-b"]]
    assert [s["status"] for s in doc["stages"]] == ["passed", "failed"], doc["stages"]
    failed = doc["stages"][1]["results"]["ro-b"]
    assert failed["failed"] and failed["failed"][0].startswith("fps: "), failed
    assert failed["after"]["fps"] < 0.8 * failed["before"]["fps"], failed
    assert "stage 2/2: ro-b failed fps:" in out and "rolled back: ro-a (done), ro-b (done)" in out
    assert doc["rolled_back"] == {"ro-a": "done", "ro-b": "done"}
    wait_until(lambda: _running(client) == {"ro-a": SHA05, "ro-b": SHA05}, 30, "both devices on depth 0.5")
    # a finished rollout is not resumed
    assert cli_main(["remote", "rollout", "--resume", "--state", str(state), *base]) == 2
    assert "this rollout is failed: nothing to resume" in capsys.readouterr().err


@pytest.mark.broker
@pytest.mark.slow
def test_a_cancelled_rollout_leaves_every_device_on_a_known_model(fleet, tmp_path):
    _, client, _ = fleet
    data = DM10.read_bytes()
    params = deploy_params(data, "dm10", chunk_size=512 * 1024)
    state_path = tmp_path / "cancel.json"
    state = Rollout.plan(["ro-a", "ro-b"], "1,100%", params, Gates(fps_ratio=None, p50_ratio=None), soak_s=30)
    state.model["file"] = str(DM10)
    lines: List[str] = []

    def out(line: str) -> None:
        lines.append(line)
        if "soaking" in line and threading.current_thread() is threading.main_thread():
            raise KeyboardInterrupt  # Ctrl-C while stage 1 soaks

    rc = Rollout(client, state, state_path, params, data, baseline_s=2.0, deploy_timeout_s=120, out=out).run()
    assert rc == 130, lines
    doc = RolloutState.load(state_path)
    assert doc.status == "cancelled" and doc.rolled_back == {"ro-a": "done"}, (doc.status, doc.rolled_back)
    wait_until(lambda: _running(client) == {"ro-a": SHA05, "ro-b": SHA05}, 30, "every device back on depth 0.5")


@pytest.mark.broker
@pytest.mark.slow
def test_an_interrupted_rollout_resumes_where_it_stopped(fleet, tmp_path, capsys):
    """The host dies after stage 1 passed (here: an exception on the stage-2 line); --resume
    does not redo stage 1 and finishes the rollout."""
    broker, client, _ = fleet
    data = DM10.read_bytes()
    params = deploy_params(data, "dm10", chunk_size=512 * 1024)
    state_path = tmp_path / "resume.json"
    state = Rollout.plan(["ro-a", "ro-b"], "1,100%", params, Gates(fps_ratio=None, p50_ratio=None), soak_s=2)
    state.model["file"], state.model["chunk_size"] = str(DM10), 512 * 1024

    class HostDied(Exception):
        pass

    def out(line: str) -> None:
        if line.startswith("stage 2/2: deploying"):
            raise HostDied

    with pytest.raises(HostDied):
        Rollout(client, state, state_path, params, data, baseline_s=2.0, deploy_timeout_s=120, out=out).run()
    saved = RolloutState.load(state_path)
    assert saved.status == "running" and [s.status for s in saved.stages] == ["passed", "deploying"]
    assert saved.stages[1].previous == {"ro-b": SHA05}  # kept: a resumed stage rolls back to it
    assert _running(client) == {"ro-a": SHA10, "ro-b": SHA05}
    base = ["--host", "127.0.0.1", "--port", str(broker.port), "--discover-s", "1"]
    assert cli_main(["remote", "rollout", "--resume", "--state", str(state_path), "--baseline-s", "2", *base]) == 0
    out_text = capsys.readouterr().out
    assert "stage 1/2" not in out_text and "stage 2/2: deploying dm10 to ro-b" in out_text
    assert RolloutState.load(state_path).status == "done"
    wait_until(lambda: _running(client) == {"ro-a": SHA10, "ro-b": SHA10}, 30, "both devices on depth 1.0")
