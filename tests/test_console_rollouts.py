"""The console's rollouts API (no browser): a real console process on a real mosquitto, with devices
that are retained availability/info only (they never answer, so a rollout stays in its first stage
until it is cancelled). The rollout logic is edge_agent.fleet.rollout's (tests/test_rollout.py);
these check what the console adds: requests validated in one line, one rollout at a time, its
devices held, the body capped, cancel through the rollout's own rollback path, state files listed
(and an interrupted one shown with how to resume it), and a read-only console refusing it all.
"""

from __future__ import annotations

import json
from typing import Any, Dict

import pytest

from edge_agent.fleet.rollout import RolloutState
from tests.broker import Recorder
from tests.helpers import ConsoleProcess, wait_until
from tests.console_page import TOKEN, _http, _page_token, _port, _upload

PREFIX = "edge-agent"
SHA_OLD = "a" * 64


def _fake_device(port: int, dev: str, tags) -> Recorder:
    device = Recorder("127.0.0.1", port, f"{PREFIX}/{dev}/none")
    device.publish(f"{PREFIX}/{dev}/availability", b"online", retain=True)
    device.publish(f"{PREFIX}/{dev}/info", json.dumps({
        "status": "running", "tags": tags, "model": {"name": "old", "sha256": SHA_OLD}}).encode(), retain=True)
    return device


def _get(url: str, path: str) -> Dict[str, Any]:
    status, body, _ = _http(url + path)
    assert status == 200, (path, status, body)
    return json.loads(body)


def _error(answer) -> str:
    return json.loads(answer[1])["error"]


@pytest.mark.broker
def test_rollouts_are_validated_one_at_a_time_cancelled_and_listed(mosquitto, tmp_path):
    broker = mosquitto()
    devices = [_fake_device(broker.port, "fk-a", ["site-a"]), _fake_device(broker.port, "fk-b", ["site-a", "door"])]
    state_dir = tmp_path / "state"
    console = ConsoleProcess(broker.port, "--state-dir", str(state_dir), "--max-upload-mb", "1")
    rollouts = state_dir / "rollouts"
    try:
        url, token, port = console.url, _page_token(console), _port(console)
        wait_until(lambda: len(_get(url, "api/devices")["devices"]) == 2, 10, "both devices known")
        assert _get(url, "api/rollouts") == {"rollouts": [], "running": None, "read_only": False}

        def post(query: str, body=(b"m" * 5000,)):
            status, answer, _ = _upload(port, f"/api/rollouts?{query}", token, list(body))
            return status, answer

        # one line naming the setting, nothing kept
        for query, status, text in (
                ("name=m", 400, "say which devices: devices=a,b, group=TAG or all=1 (one of them)"),
                ("group=site-a&all=1&name=m", 400, "say which devices"),
                ("devices=fk-a,nope&name=m", 400, "devices: unknown device(s) nope"),
                ("group=nowhere&name=m", 400, "no device online in group 'nowhere' (groups seen: door, site-a"),
                ("group=site-a", 400, "name: give the model a name"),
                ("group=site-a&name=m&stages=1", 400, "--stages '1': the last stage covers 1 of 2 devices; end with 100%"),
                ("group=site-a&name=m&fps_ratio=fast", 400, "fps_ratio: expected a number 0..100, got 'fast'"),
                ("group=site-a&name=m&soak_s=-1", 400, "soak_s: expected a number"),
        ):
            answer = post(query)
            assert answer[0] == status and _error(answer).startswith(text), (query, answer)
        assert post("group=site-a&name=m", body=())[0] == 400  # an empty body: no model
        big = post("group=site-a&name=m", body=(b"x" * (1024 * 1024),) * 2)
        assert big[0] == 413 and _error(big) == "the model is larger than --max-upload-mb 1", big
        assert not rollouts.exists() or list(rollouts.iterdir()) == []
        # the token is needed as for every command
        assert _http(url + "api/rollouts?group=site-a&name=m", "POST", b"m")[0] == 403

        # accepted: the state file (what `remote rollout --resume` reads) and the model are kept
        status, answer = post("group=site-a&name=newer&stages=1,100%&soak_s=600&baseline_s=1&timeout_s=600")
        assert status == 202, answer
        doc = json.loads(answer)
        rid = doc["id"]
        assert doc["status"] == "running" and doc["outcome"] == "running" and doc["model"]["name"] == "newer"
        assert [s["devices"] for s in doc["stages"]] == [["fk-a"], ["fk-b"]]
        assert RolloutState.load(rollouts / f"{rid}.json").status == "running"
        assert (rollouts / f"{rid}.tflite").read_bytes() == b"m" * 5000
        # one at a time; its devices are held against deployments
        busy = post("devices=fk-b&name=other")
        assert busy[0] == 409 and _error(busy) == f"rollout {rid} is running: one at a time (cancel it or let it end)"
        held = _upload(port, "/api/deploy?devices=fk-a&name=x", token, [b"m"])
        assert held[0] == 409 and f"already running on fk-a ({rid})" in _error(held), held
        assert _get(url, "api/rollouts")["running"] == rid
        # stage 1 deploys to fk-a, which never answers; cancel: the rollout's own path (it waits for
        # the deployment's answers, then rolls fk-a back, which does not answer either)
        wait_until(lambda: _get(url, f"api/rollouts/{rid}")["stages"][0]["status"] == "deploying", 30, "stage 1")
        status, answer, _ = _http(url + f"api/rollouts/{rid}/cancel", "POST", b"", {"X-Console-Token": token})
        assert status == 202 and json.loads(answer)["cancelling"] is True, answer
        assert _get(url, "api/rollouts")["rollouts"][0]["cancelling"] is True
    finally:
        output = console.stop()
        for device in devices:
            device.close()
    assert "Traceback" not in output, output


@pytest.mark.broker
def test_a_cancelled_rollout_rolls_back_and_frees_its_devices(mosquitto, tmp_path):
    broker = mosquitto()
    device = _fake_device(broker.port, "fk-c", ["lab"])
    state_dir = tmp_path / "state"
    console = ConsoleProcess(broker.port, "--state-dir", str(state_dir))
    rollouts = state_dir / "rollouts"
    try:
        url, token, port = console.url, _page_token(console), _port(console)
        wait_until(lambda: _get(url, "api/devices")["devices"], 10, "fk-c known")
        status, answer, _ = _upload(port, "/api/rollouts?all=1&name=newer&stages=100%&baseline_s=1&timeout_s=5",
                                    token, [b"m" * 100])
        assert status == 202, answer
        rid = json.loads(answer)["id"]
        wait_until(lambda: _get(url, f"api/rollouts/{rid}")["stages"][0]["status"] == "deploying", 30, "stage 1")
        assert _http(url + f"api/rollouts/{rid}/cancel", "POST", b"", {"X-Console-Token": token})[0] == 202
        doc = wait_until(lambda: (lambda d: d if d["status"] != "running" else None)(_get(url, f"api/rollouts/{rid}")),
                         60, "the cancelled rollout to end")
        assert doc["status"] == "cancelled" and doc["outcome"] == "cancelled", doc
        assert "cancelled: rolling back the devices this rollout changed" in doc["report"]
        assert any(line.startswith("cancel asked") for line in doc["lines"])
        # the stage had started: fk-c is rolled back to what it ran (it never answers: a red cell on the page)
        assert doc["stages"][0]["previous"] == {"fk-c": SHA_OLD}
        assert doc["stages"][0]["status"] == "cancelled"  # shown where it stopped (the file keeps which step)
        assert json.loads((rollouts / f"{rid}.json").read_text())["stages"][0]["status"] in ("deploying", "soaking")
        assert list(doc["rolled_back"]) == ["fk-c"] and doc["rolled_back"]["fk-c"].startswith("timeout"), doc
        assert not (rollouts / f"{rid}.tflite").exists()  # finished: nothing will resume it
        again = _http(url + f"api/rollouts/{rid}/cancel", "POST", b"", {"X-Console-Token": token})
        assert again[0] == 409 and _error(again) == f"rollout {rid} is not running here: nothing to cancel"
        # the device is free again and another rollout may start
        wait_until(lambda: _get(url, "api/rollouts")["running"] is None, 10, "no rollout running")
        assert _upload(port, "/api/deploy?devices=fk-c&name=x", token, [])[0] == 400  # 400: empty, not 409

        # an interrupted rollout (its console stopped) is listed with how to resume it; junk is skipped
        other = "rollout-20240101-000000-abcdef"
        stopped = json.loads((rollouts / f"{rid}.json").read_text())
        stopped["status"] = "running"
        (rollouts / f"{other}.json").write_text(json.dumps(stopped))
        (rollouts / "rollout-junk.json").write_text("{")
        (rollouts / "rollout-20240101-000001-abcdef.json").write_text("[]")
        (rollouts / "rollout-20240101-000002-abcdef.json").write_text('{"stages": [1]}')
        listed = _get(url, "api/rollouts")["rollouts"]
        assert [r["id"] for r in listed] == [rid, other], listed
        assert listed[1]["outcome"] == "interrupted" and listed[1]["started_at"] == 1704067200.0
        interrupted = _get(url, f"api/rollouts/{other}")
        assert interrupted["resume"] == f"edge-agent remote rollout --resume --state {rollouts / (other + '.json')}"
        for bad in ("rollout-nope", "..%2F..%2Fetc%2Fpasswd"):
            assert _http(url + f"api/rollouts/{bad}")[0] in (400, 404)
    finally:
        output = console.stop()
        device.close()
    assert "Traceback" not in output, output


@pytest.mark.broker
def test_a_read_only_console_lists_rollouts_and_refuses_to_start_or_cancel_them(mosquitto, tmp_path, monkeypatch):
    broker = mosquitto()
    monkeypatch.setenv("EDGE_AGENT_CONSOLE_TOKEN", TOKEN)
    console = ConsoleProcess(broker.port, "--read-only", "--state-dir", str(tmp_path))
    try:
        auth = {"X-Console-Token": TOKEN}
        status, body, _ = _http(console.url + "api/rollouts", headers=auth)
        assert status == 200 and json.loads(body)["read_only"] is True
        for path in ("api/rollouts?all=1&name=m", "api/rollouts/rollout-20240101-000000-abcdef/cancel"):
            status, answer, _ = _http(console.url + path, "POST", b"model", auth)
            assert status == 403 and json.loads(answer)["error"].startswith("read-only console"), (path, answer)
        assert not (tmp_path / "rollouts").exists()
    finally:
        console.stop()
