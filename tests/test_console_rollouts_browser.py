"""The Rollouts tab in Debian's headless chromium, with two real agents and a real mosquitto.

As tests/test_rollout.py: ``ro-a`` is paced at 2 fps (either model keeps up), ``ro-b`` reads its
folder as fast as it can, so the depth-1.0 model lowers its fps far below the 0.8x gate. A rollout
to group site-a started from the tab passes stage 1 (ro-a) and fails stage 2 (ro-b): the page
shows the stage tables, ro-b's failed fps gate in red with its numbers, both devices rolled back,
and the "rolled back" badge. A second rollout is cancelled from the tab while stage 1 soaks: the
"cancelled" badge, ro-a rolled back, both devices on depth 0.5. Screenshots: tmp dir and
out/console-screenshots/rollouts-*.png.
"""

from __future__ import annotations

import json
import urllib.request
from typing import Dict

import pytest

from tests.data import DM10
from tests.helpers import ConsoleProcess, chromium, wait_until
from tests.console_page import _click, _shot, need_browser
from tests.rollout_agents import SHA05, _running, two_agents


def _detail(driver) -> Dict[str, object]:
    """What the Rollouts tab shows of the selected rollout: its badge, report, and stage tables."""
    return driver.execute_script("""
        const q = (s) => document.querySelector(s);
        return {outcome: q('#rollout-outcome').dataset.outcome || null,
                cancel: !q('#rollout-cancel').hidden,
                report: [...document.querySelectorAll('#rollout-report li')].map(li => [li.className, li.textContent]),
                stages: [...document.querySelectorAll('table.rollout-stage')].map(t => ({
                    status: t.closest('.rollout-stage-box').querySelector('h4 .badge').textContent,
                    rows: [...t.querySelectorAll('tbody tr')].map(tr => ({
                        device: tr.dataset.device, red: tr.classList.contains('failed'),
                        gates: tr.cells[1].textContent, gatesClass: tr.cells[1].className,
                        gateColor: getComputedStyle(tr.cells[1]).color,
                        fps: tr.cells[2].textContent, rollback: tr.cells[4].textContent}))}))};""")


def _start(driver, stages: str, soak: int, fps_ratio: str) -> None:
    _click(driver, '#tabs button[data-tab="rollouts"]')
    wait_until(lambda: driver.execute_script(
        "return [...document.querySelectorAll('#rollout-target option')].map(o => o.value)"
    ) and "group:site-a" in driver.execute_script(
        "return [...document.querySelectorAll('#rollout-target option')].map(o => o.value)"), 20, "the group option")
    driver.execute_script("document.querySelector('#rollout-target').value = 'group:site-a'")
    driver.find_element("css selector", "#rollout-file").send_keys(str(DM10))
    for field, value in (("name", "dm10"), ("stages", stages), ("soak", str(soak)), ("baseline", "5"),
                         ("fps", fps_ratio), ("p50", "0")):
        driver.execute_script(f"document.querySelector('#rollout-{field}').value = arguments[0]", value)
    _click(driver, "#rollout-start")


@pytest.mark.broker
@pytest.mark.browser
@pytest.mark.slow
def test_rollouts_tab_starts_shows_a_failed_gate_rolls_back_and_cancels(mosquitto, tmp_path):
    need_browser()
    broker = mosquitto()
    with two_agents(tmp_path, broker.port) as (client, _):
        console = ConsoleProcess(broker.port, "--state-dir", str(tmp_path / "console-state"))
        driver = None
        try:
            wait_until(lambda: _running(client) == {"ro-a": SHA05, "ro-b": SHA05}, 60, "both agents on depth 0.5")
            driver = chromium(tmp_path / "chromium-profile", width=1400, height=1000)
            driver.get(console.url)

            # -- a rollout whose stage 2 fails the fps gate: stopped, both devices rolled back
            _start(driver, "1,100%", soak=6, fps_ratio="0.8")
            wait_until(lambda: _detail(driver)["outcome"] == "running", 20, "the rollout running")
            wait_until(lambda: _detail(driver)["outcome"] not in ("running", None), 180, "the rollout to end")
            shown = _detail(driver)
            _shot(driver, tmp_path, "rollouts-1-failed-gate")
            assert shown["outcome"] == "rolled back", shown
            assert [s["status"] for s in shown["stages"]] == ["passed", "failed"], shown
            (a,), (b,) = shown["stages"][0]["rows"], shown["stages"][1]["rows"]
            assert a["device"] == "ro-a" and a["gates"] == "passed" and not a["red"], a
            assert b["device"] == "ro-b" and b["red"] and b["gatesClass"] == "gate-failed", b
            assert b["gates"].startswith("fps: ") and "x < 0.8x" in b["gates"], b  # the reason, with its numbers
            assert b["gateColor"] == "rgb(180, 35, 24)", b  # --bad: red
            assert a["rollback"] == "rolled back" and b["rollback"] == "rolled back", shown
            assert any(cls == "failed" and "stage 2/2: ro-b failed fps:" in text for cls, text in shown["report"]), shown
            assert not shown["cancel"]
            listed = driver.execute_script("return [...document.querySelectorAll('#rollouts-list tbody tr')]"
                                           ".map(tr => tr.cells[4].textContent)")
            assert len(listed) == 1 and listed[0].startswith("rolled back") and "ro-b failed fps" in listed[0], listed
            wait_until(lambda: _running(client) == {"ro-a": SHA05, "ro-b": SHA05}, 30, "both devices back on depth 0.5")

            # -- a rollout cancelled from the tab while stage 1 soaks: ro-a rolled back
            _start(driver, "1,100%", soak=120, fps_ratio="0")
            wait_until(lambda: driver.execute_script(
                "return document.querySelectorAll('#rollouts-list tbody tr').length") == 2, 20, "the second rollout listed")
            wait_until(lambda: (lambda d: d["cancel"] and d["stages"] and d["stages"][0]["status"] == "soaking")(
                _detail(driver)), 120, "stage 1 soaking, the Cancel button shown")
            _click(driver, "#rollout-cancel")
            wait_until(lambda: _detail(driver)["outcome"] == "cancelled", 120, "the cancelled badge")
            shown = _detail(driver)
            _shot(driver, tmp_path, "rollouts-2-cancelled")
            assert [s["status"] for s in shown["stages"]] == ["cancelled", "pending"], shown  # where it stopped
            assert shown["stages"][0]["rows"][0]["gates"] == "not checked", shown
            assert shown["stages"][0]["rows"][0]["rollback"] == "rolled back" and not shown["cancel"], shown
            assert shown["stages"][1]["rows"][0]["rollback"] == "", shown  # never reached
            wait_until(lambda: _running(client) == {"ro-a": SHA05, "ro-b": SHA05}, 30, "both devices on depth 0.5")
            docs = json.loads(urllib.request.urlopen(console.url + "api/rollouts").read())["rollouts"]
            assert [d["outcome"] for d in docs] == ["cancelled", "rolled back"], docs
            severe = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
            assert severe == [], severe  # no script error, no refused request
        finally:
            if driver is not None:
                driver.quit()
            output = console.stop()
    assert "Traceback" not in output, output


@pytest.mark.broker
@pytest.mark.browser
def test_a_read_only_console_shows_rollouts_without_controls(mosquitto, tmp_path):
    need_browser()
    broker = mosquitto()
    console = ConsoleProcess(broker.port, "--read-only", "--state-dir", str(tmp_path / "state"))
    driver = None
    try:
        driver = chromium(tmp_path / "chromium-profile")
        driver.get(console.url)
        _click(driver, '#tabs button[data-tab="rollouts"]')
        wait_until(lambda: driver.execute_script("return !document.querySelector('#tab-rollouts').hidden"), 10,
                   "the Rollouts tab shown")
        assert driver.execute_script("return document.querySelector('#rollout-form').hidden") is True
        assert driver.execute_script("return document.querySelector('#rollouts-empty').textContent") == "No rollout yet."
    finally:
        if driver is not None:
            driver.quit()
        console.stop()
