"""The console as a person sees it (issue 25), in Debian's headless chromium against real agents and
a real mosquitto: the picture, mask, class table and timings shown are ONE frame's (checked against
the agent's own result of that seq), a device whose model cannot run says why in the page text, a
deployment the device refuses gets a failed badge, a killed agent shows "last seen", and the page
works at phone width. Screenshots (desktop and 375 px) go to the test's tmp dir and to
out/console-screenshots/ (kept after the run, for people to look at).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Dict, List

import pytest

from tests.broker import Recorder
from tests.data import IMAGES, INVOKE_ERROR, VOC
from tests.helpers import ConsoleProcess, chromium, stop_agent, wait_until, write_config
from tests.console_page import _click, _fleet, _kill_device, _shot, _table, need_browser

PREFIX = "edge-agent"
WATCHED = ["aeroplane", "bird", "person"]


def _agent(tmp_path: Path, dev: str, port: int, tags: List[str] = (), **sections) -> subprocess.Popen:
    """A real agent whose output goes to a file (an undrained pipe would block it)."""
    (tmp_path / dev).mkdir()
    config = write_config(tmp_path / dev / "agent.toml", dev, port,
                          {"kind": "folder", "uri": str(VOC / "JPEGImages"), "fps": 3.0, "loop": True}, **sections)
    if tags:
        config.write_text(config.read_text().replace("[agent]\n", f"[agent]\ntags = {json.dumps(list(tags))}\n", 1))
    log = open(tmp_path / dev / "agent.log", "wb")
    return subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                            stdout=log, stderr=subprocess.STDOUT)


def _shown(driver) -> Dict[str, object]:
    """What the device view shows now: the seq inside the drawn image's bytes, the class table's
    and the timings' seq, and the class table's cells."""
    return driver.execute_script("""
        const q = (s) => document.querySelector(s);
        return {image: q('#device-canvas').dataset.seq || null, what: q('#device-canvas').dataset.what || null,
                camera: q('#device-canvas').dataset.camera ?? null,
                classes: q('#device-classes').dataset.seq || null, stages: q('#device-stages').dataset.seq || null,
                rows: [...q('#device-classes').querySelectorAll('tbody tr')].map(tr => [tr.cells[0].textContent,
                                                                                    tr.cells[1].textContent])};""")


def _too_wide(driver) -> List[str]:
    """Elements reaching beyond the window's right edge (horizontal scrolling of the page)."""
    return driver.execute_script("""
        const w = document.documentElement.clientWidth;
        if (document.documentElement.scrollWidth <= w) return [];
        return [...document.querySelectorAll('body *')].filter(e => e.offsetParent !== null
                 && e.getBoundingClientRect().right > w + 1 && !e.closest('.scroll'))
               .map(e => e.tagName + '#' + e.id + '.' + e.className + ' ' + Math.round(e.getBoundingClientRect().right));""")


def _sample_frames(driver, results: Dict[int, dict], view: str, samples: int) -> List[int]:
    driver.execute_script(f"const s = document.querySelector('#device-view'); s.value = '{view}'; "
                          "s.dispatchEvent(new Event('change'))")
    seen: List[int] = []
    want = "overlay" if view == "photo" else "mask"
    while len(seen) < samples:
        shown = wait_until(lambda: (lambda s: s if s["image"] and s["what"] == want and (not seen or int(s["image"]) != seen[-1])
                                    else None)(_shown(driver)), 30, f"a new {view} frame")
        seq = int(shown["image"])
        # one frame: the seq inside the picture's bytes = the class table's = the timings'
        assert shown["classes"] == shown["image"] and shown["stages"] == shown["image"], shown
        # ... and the class table is the agent's own result of that seq
        result = wait_until(lambda: results.get(seq), 10, f"the result of frame {seq}")
        expected = sorted((name, f"{100 * f:.1f} %") for name, f in result["classes"].items())
        assert sorted(tuple(r) for r in shown["rows"]) == expected, (seq, shown["rows"], result["classes"])
        seen.append(seq)
    return seen


@pytest.mark.broker
@pytest.mark.browser
@pytest.mark.slow
def test_frame_truth_errors_first_and_phone_width(mosquitto, tmp_path):
    need_browser()
    broker = mosquitto()
    results: Dict[int, dict] = {}
    rec = Recorder("127.0.0.1", broker.port, f"{PREFIX}/+/availability")

    def on_result(client, userdata, msg):  # the agent's own results, by seq
        if msg.topic == f"{PREFIX}/cam-ok/result":
            doc = json.loads(msg.payload)
            results[doc["seq"]] = doc
    watcher = Recorder("127.0.0.1", broker.port, f"{PREFIX}/cam-ok/result")
    watcher.client.on_message = on_result
    agents = {
        "cam-ok": _agent(tmp_path, "cam-ok", broker.port, tags=["site-a", "entrance"],
                         publish={"overlay": True, "overlay_max_hz": 2.0, "timings": "frame",
                                  "stats_interval_s": 2.0},
                         # the watched classes (the VOC photos hold aeroplanes and birds, no person)
                         homeassistant={"classes": WATCHED}),
        "cam-bad": _agent(tmp_path, "cam-bad", broker.port, model={"path": str(INVOKE_ERROR)},
                          publish={"stats_interval_s": 2.0}),
    }
    console = ConsoleProcess(broker.port)
    driver = None
    try:
        driver = chromium(tmp_path / "chromium-profile", width=1400, height=1000)
        driver.get(console.url)
        text = lambda: driver.execute_script("return document.body.innerText")

        # -- fleet: the broken device is red with its reason as text; tags shown
        levels = lambda: driver.execute_script(
            "return Object.fromEntries([...document.querySelectorAll('#fleet tbody tr')]"
            ".map(tr => [tr.dataset.device, tr.dataset.level]))")
        wait_until(lambda: levels() == {"cam-ok": "ok", "cam-bad": "error"}, 90, "cam-ok ok and cam-bad in error")
        assert "cannot prepare this model" in text()
        badge = driver.execute_script("const b = document.querySelector('#fleet tr[data-device=\"cam-bad\"] .badge');"
                                      "return [b.textContent, getComputedStyle(b).backgroundColor]")
        assert badge[0] == "error" and badge[1] == "rgb(251, 213, 208)", badge  # red, never green
        fleet = _fleet(driver)
        assert fleet["cam-ok"]["groups"] == "site-aentrance" and fleet["cam-ok"]["model"] == "deeplabv3_mnv2_dm05_pascal_quant"
        wait_until(lambda: _fleet(driver)["cam-ok"]["fps"] != "–", 30, "live fps in the fleet table")
        wait_until(lambda: _fleet(driver)["cam-ok"]["health"] != "–", 30, "the health cell")
        # a healthy device's latency sparkline shows its line (a first point as a dot): inked pixels
        # in the inference or end-to-end colour (the two overlap where the values are close)
        inked = lambda: driver.execute_script("""
            const c = document.querySelector('#fleet tr[data-device="cam-ok"] canvas.spark');
            const px = c.getContext('2d').getImageData(26, 0, c.width - 26, c.height - 12).data;
            let inf = 0, e2e = 0;
            for (let i = 0; i < px.length; i += 4) {
              if (px[i + 3] < 128) continue;
              if (px[i] < 80 && px[i + 2] > 140) inf++; else if (px[i] > 180 && px[i + 2] < 60) e2e++;
            }
            return inf + e2e > 6;""")
        wait_until(inked, 30, "the sparkline's lines")
        # ... and a device heard for less than one 30 s step (ONE point per series) is not blank
        assert driver.execute_script("""
            const c = document.createElement('canvas'); c.width = 150; c.height = 40;
            drawSpark(c, [[Date.now() / 1000 - 5, 40.0, 90.0]]);
            const px = c.getContext('2d').getImageData(26, 0, c.width - 26, c.height - 12).data;
            let inf = 0, e2e = 0;
            for (let i = 0; i < px.length; i += 4) {
              if (px[i + 3] < 128) continue;
              if (px[i] < 80 && px[i + 2] > 140) inf++; else if (px[i] > 180 && px[i + 2] < 60) e2e++;
            }
            return inf > 3 && e2e > 3;""")
        # the whole table fits a desktop window: no sideways scrolling from 1280 px on
        for width in (1400, 1280):
            driver.set_window_size(width, 1000)
            overflow = wait_until(lambda: driver.execute_script(
                "const s = document.querySelector('#tab-fleet .scroll'); "
                "return s.clientWidth <= window.innerWidth ? [s.scrollWidth, s.clientWidth] : null"), 5, f"{width} px")
            assert overflow[0] <= overflow[1], f"the fleet table is wider than a {width} px window: {overflow}"
        driver.set_window_size(1400, 1000)
        # filtering by tag and state
        driver.execute_script("const f = document.querySelector('#fleet-filter'); f.value = 'entrance';"
                              "f.dispatchEvent(new Event('input'))")
        wait_until(lambda: list(levels()) == ["cam-ok"], 5, "the tag filter")
        driver.execute_script("const f = document.querySelector('#fleet-filter'); f.value = '';"
                              "f.dispatchEvent(new Event('input'));"
                              "const s = document.querySelector('#fleet-state'); s.value = 'error';"
                              "s.dispatchEvent(new Event('change'))")
        wait_until(lambda: list(levels()) == ["cam-bad"], 5, "the state filter")
        driver.execute_script("const s = document.querySelector('#fleet-state'); s.value = '';"
                              "s.dispatchEvent(new Event('change'))")
        wait_until(lambda: len(levels()) == 2, 5, "both again")
        _shot(driver, tmp_path, "1-fleet-desktop")

        # -- the broken device's view says so, in words
        _click(driver, '#fleet tr[data-device="cam-bad"] a')
        wait_until(lambda: driver.execute_script("return !document.querySelector('#device-alert').hidden"), 10,
                   "the error banner")
        alert = driver.execute_script("return document.querySelector('#device-alert').innerText")
        assert alert.startswith("Error: ") and "cannot prepare this model" in alert, alert
        _shot(driver, tmp_path, "2-device-error")

        # -- frame truth, over 20 samples of the photo view and 10 of the mask view
        driver.execute_script("const s = document.querySelector('#device-select'); s.value = 'cam-ok';"
                              "s.dispatchEvent(new Event('change'))")
        photos = _sample_frames(driver, results, "photo", 20)
        masks = _sample_frames(driver, results, "mask", 10)
        assert photos == sorted(photos) and masks == sorted(masks)
        driver.execute_script("const s = document.querySelector('#device-view'); s.value = 'photo';"
                              "s.dispatchEvent(new Event('change'))")
        # charts with time axes, an event timeline, facts
        wait_until(lambda: driver.execute_script(
            "return ['#chart-fps', '#chart-latency', '#chart-coverage'].every(s => document.querySelector(s + ' .u-axis'))"),
            30, "the three charts")
        # their time labels are 24 h like the rest of the page (uPlot's default is am/pm): the axis
        # ticks as drawn, and the legend's time under the cursor
        ticks = driver.execute_script("return charts.fps.axes[0]._values")
        assert ticks and all(re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d(:[0-5]\d)?", t) for t in ticks if t), ticks
        legend = driver.execute_script(
            "const u = charts.latency; u.setCursor({left: u.bbox.width / devicePixelRatio / 2, top: 10});"
            "return u.root.querySelector('.u-legend .u-series:first-child .u-value').textContent")
        assert re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d:[0-5]\d", legend), legend
        wait_until(lambda: driver.execute_script("return document.querySelectorAll('#device-events li[data-cls]').length"),
                   30, "an event in the timeline")
        # the coverage chart and the timeline are of the watched classes (info.cameras[0].watched), though
        # the photos show others too (sheep, bus, ...) and no person
        series = driver.execute_script("return charts.coverage.series.slice(1).map(s => s.label)")
        assert series == [f"{c} %" for c in WATCHED], series
        events = driver.execute_script("return [...document.querySelectorAll('#device-events li[data-cls]')]"
                                       ".map(li => li.dataset.cls)")
        assert set(events) <= set(WATCHED) - {"person"}, events
        assert "Coverage of the watched classes" in text()
        assert "waiting for the next frame" in text()  # the capture stage is not presented as work
        facts = driver.execute_script("return document.querySelector('#device-facts').innerText")
        for word in ("uptime", "last seen", "runtime", "delegate", "folder"):
            assert word in facts.lower(), facts
        # store-and-forward is on by default: its backlog is a fact (empty, or what waits), never "off"
        assert re.search(r"offline backlog\s+(empty|\d+ waiting)", facts), facts
        _shot(driver, tmp_path, "3-device-desktop")
        driver.execute_script("document.querySelector('.charts').scrollIntoView()")
        _shot(driver, tmp_path, "3b-device-charts")
        driver.execute_script("window.scrollTo(0, 0)")
        driver.set_window_size(375, 900)
        wait_until(lambda: driver.execute_script("return document.documentElement.clientWidth") <= 375, 5, "375 px")
        _shot(driver, tmp_path, "4-device-375px")
        assert _too_wide(driver) == [], "the device page is wider than a phone"
        _click(driver, '#tabs button[data-tab="fleet"]')
        _shot(driver, tmp_path, "5-fleet-375px")
        assert _too_wide(driver) == [], "the fleet page is wider than a phone"
        driver.set_window_size(1400, 1000)

        # -- a deployment the device refuses: a failed badge (red), the reason as text
        _click(driver, '#tabs button[data-tab="deploy"]')
        # devices by group (agent.tags): a group's button checks exactly its online devices
        picks = "#tab-deploy .group-pick"
        wait_until(lambda: driver.execute_script(f"return document.querySelector('{picks} button[data-group=\"entrance\"]')"),
                   10, "the group buttons")
        assert driver.execute_script(f"return [...document.querySelectorAll('{picks} button')].map(b => b.textContent)") == [
            "all online (2)", "entrance (1)", "site-a (1)"]
        _click(driver, f'{picks} button[data-group="all online"]')
        _click(driver, f'{picks} button[data-group="entrance"]')
        assert driver.execute_script("return [...document.querySelectorAll('#deploy-devices input:checked')]"
                                     ".map(i => i.value)") == ["cam-ok"]
        driver.find_element("css selector", "#deploy-file").send_keys(str(INVOKE_ERROR))
        _click(driver, "#deploy-start")
        outcome = lambda: driver.execute_script("return document.querySelector('#deploy-status').dataset.outcome || null")
        wait_until(lambda: outcome() in ("done", "failed", "partly failed"), 120, "the deployment's end")
        assert outcome() == "failed"
        assert driver.execute_script("return document.querySelector('#deploy-status').className") == "badge failed"
        assert driver.execute_script("return document.querySelector('#deploy-status').textContent") == "deploy failed"
        wait_until(lambda: _table(driver, "#models-table"), 20, "the store listing after the deployment")
        models = _table(driver, "#models-table")
        assert any(r[2] == "running" and r[3].startswith("deeplabv3") and r[5].endswith(("KB", "MB")) for r in models), models
        _shot(driver, tmp_path, "6-deploy-failed")

        # -- cam-ok killed: "last seen … ago" instead of its last numbers
        _kill_device(driver, rec, agents["cam-ok"], "cam-ok")
        wait_until(lambda: levels().get("cam-ok") == "offline", 10, "cam-ok offline in the page")
        row = driver.execute_script("return document.querySelector('#fleet tr[data-device=\"cam-ok\"]').innerText")
        assert row.count("last seen") == 1 and " ago" in row, row  # once, in the state cell
        assert _fleet(driver)["cam-ok"]["fps"] == "–"  # no stale numbers
        _shot(driver, tmp_path, "7-fleet-offline")
        _click(driver, '#fleet tr[data-device="cam-ok"] a')
        alert = wait_until(lambda: driver.execute_script(
            "const a = document.querySelector('#device-alert'); return a.hidden ? null : a.innerText"), 10, "offline banner")
        assert alert.startswith("Offline") and "last seen" in alert

        # -- no 404s: favicon and the shipped chart library
        for path in ("favicon.ico", "static/favicon.svg", "static/vendor/uPlot.iife.min.js", "static/vendor/uPlot.min.css"):
            assert urllib.request.urlopen(console.url + path).status == 200
    finally:
        if driver is not None:
            driver.quit()
        output = console.stop()
        for proc in agents.values():
            stop_agent(proc)
        rec.close()
        watcher.close()
    assert "Traceback" not in output, output


CAMERAS = {"door": (VOC / "JPEGImages", ["aeroplane", "bird"]), "yard": (IMAGES, [])}


@pytest.mark.broker
@pytest.mark.browser
@pytest.mark.slow
def test_camera_picker_shows_each_cameras_own_frames(mosquitto, tmp_path):
    """A real agent with two [[cameras]] (folders of real photos): the device page offers a camera
    picker, and each camera shows its own frames (the camera and seq inside the picture's bytes match
    the class table, the timings and that camera's own result), its watched classes in the chart."""
    need_browser()
    broker = mosquitto()
    results: Dict[str, Dict[int, dict]] = {cam: {} for cam in CAMERAS}

    def on_result(client, userdata, msg):
        doc = json.loads(msg.payload)
        results[msg.topic.split("/")[-2]][doc["seq"]] = doc
    watcher = Recorder("127.0.0.1", broker.port, f"{PREFIX}/multi/camera/+/result")
    watcher.client.on_message = on_result
    (tmp_path / "multi").mkdir()
    config = write_config(tmp_path / "multi" / "agent.toml", "multi", broker.port, {},
                          publish={"overlay": True, "overlay_max_hz": 2.0, "timings": "frame", "stats_interval_s": 2.0})
    config.write_text(config.read_text() + "".join(
        f'\n[[cameras]]\nid = "{cam}"\nkind = "folder"\nuri = "{folder}"\nfps = 2.0\nloop = true\nclasses = {json.dumps(classes)}\n'
        for cam, (folder, classes) in CAMERAS.items()))
    log = open(tmp_path / "multi" / "agent.log", "wb")
    agent = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                             stdout=log, stderr=subprocess.STDOUT)
    console = ConsoleProcess(broker.port)
    driver = None
    try:
        driver = chromium(tmp_path / "chromium-profile", width=1400, height=1000)
        driver.get(console.url)
        wait_until(lambda: _fleet(driver).get("multi", {}).get("fps", "–") != "–", 90, "the two-camera agent running")
        _click(driver, '#fleet tr[data-device="multi"] a')
        options = wait_until(lambda: driver.execute_script(
            "const p = document.querySelector('#camera-pick');"
            "return p.hidden ? null : [...document.querySelectorAll('#camera-select option')].map(o => o.value)"),
            30, "the camera picker")
        assert options == sorted(CAMERAS), options
        for cam in ("yard", "door"):  # the second camera first: the picker is what switches
            driver.execute_script(f"const s = document.querySelector('#camera-select'); s.value = '{cam}';"
                                  "s.dispatchEvent(new Event('change'))")
            seen: List[int] = []
            while len(seen) < 4:
                shown = wait_until(lambda: (lambda s: s if s["camera"] == cam and s["image"] and s["what"] == "overlay"
                                            and (not seen or int(s["image"]) != seen[-1]) else None)(_shown(driver)),
                                   30, f"a new {cam} frame")
                seq = int(shown["image"])
                assert shown["classes"] == shown["image"] and shown["stages"] == shown["image"], shown
                result = wait_until(lambda: results[cam].get(seq), 10, f"the result of {cam} frame {seq}")
                assert result["camera"] == cam
                expected = sorted((name, f"{100 * f:.1f} %") for name, f in result["classes"].items())
                assert sorted(tuple(r) for r in shown["rows"]) == expected, (cam, seq, shown["rows"], result["classes"])
                seen.append(seq)
            # the facts name the camera shown: its source and fps, the device's total beside it
            facts = wait_until(lambda: (lambda f: f if f"source ({cam})" in f and f"fps ({cam})" in f else None)(
                driver.execute_script("return document.querySelector('#device-facts').innerText")), 15, f"{cam}'s facts")
            assert "folder" in facts and "(device " in facts, facts
            # the camera's own watched classes in its coverage chart (door: its classes; yard: the default)
            watched = CAMERAS[cam][1] or ["person", "car", "cat", "dog"]
            wait_until(lambda: driver.execute_script(
                "return charts.coverage && charts.coverage.series.slice(1).map(s => s.label).join()")
                == ",".join(f"{c} %" for c in watched), 15, f"{cam}'s watched classes in the coverage chart")
            driver.execute_script("window.scrollTo(0, 0)")
            _shot(driver, tmp_path, f"8-device-camera-{cam}")
        driver.set_window_size(375, 900)
        wait_until(lambda: driver.execute_script("return document.documentElement.clientWidth") <= 375, 5, "375 px")
        _shot(driver, tmp_path, "8-device-cameras-375px")
        assert _too_wide(driver) == [], "the device page with a camera picker is wider than a phone"
    finally:
        if driver is not None:
            driver.quit()
        output = console.stop()
        stop_agent(agent)
        watcher.close()
    assert "Traceback" not in output, output
