"""The automatic interpreter layout (model.interpreters/threads = 0): the pure choice, and the agent
that runs it, says it in ``info.layout`` and logs it at start-up."""

from __future__ import annotations

import logging

import pytest

from edge_agent.config import load_config
from edge_agent.daemon.agent import Agent
from edge_agent.inference import layout
from edge_agent.inference.layout import Layout, SourceLoad, choose_layout, for_config
from tests.data import DM05, IMAGES
from tests.helpers import wait_until

FOLDER = SourceLoad("folder", 0.0, live=False)
CAMERA_15 = SourceLoad("picamera2", 15.0, live=True)


# -- the pure choice ------------------------------------------------------------------------------

def test_unpaced_folder_gets_one_interpreter_per_core():
    got = choose_layout(2, [FOLDER])
    assert (got.interpreters, got.threads, got.auto) == (2, 1, True)
    assert "folder source read at full speed (fps = 0)" in got.reason and "one interpreter per core" in got.reason
    four = choose_layout(4, [FOLDER])
    assert (four.interpreters, four.threads) == (4, 1)


def test_paced_live_camera_gets_one_interpreter_on_all_cores():
    got = choose_layout(4, [CAMERA_15])
    assert (got.interpreters, got.threads) == (1, 4)
    assert got.reason.startswith("latency: one paced camera (picamera2 at 15 fps)")


def test_paced_camera_faster_than_one_interpreter_serves_goes_per_core():
    assert choose_layout(4, [CAMERA_15], serve_fps=20.0).interpreters == 1
    got = choose_layout(4, [CAMERA_15], serve_fps=10.0)
    assert (got.interpreters, got.threads) == (4, 1) and "15 fps asked, one interpreter serves 10.0" in got.reason


def test_unpaced_live_stream_video_file_and_several_cameras_go_per_core():
    stream = choose_layout(2, [SourceLoad("opencv", 0.0, live=True)])
    assert stream.interpreters == 2 and "opencv source (fps = 0)" in stream.reason
    assert choose_layout(2, [SourceLoad("opencv", 0.0, live=False)]).interpreters == 2
    several = choose_layout(4, [CAMERA_15, SourceLoad("opencv", 5.0, live=True)])
    assert (several.interpreters, several.threads) == (4, 1) and "2 cameras share the interpreters" in several.reason


def test_edge_tpu_one_cpu_and_little_memory_keep_one_interpreter():
    tpu = choose_layout(4, [FOLDER], edgetpu=True)
    assert (tpu.interpreters, tpu.threads) == (1, 4) and "Edge TPU" in tpu.reason
    one = choose_layout(1, [FOLDER])
    assert (one.interpreters, one.threads) == (1, 1) and "1 core" in one.reason
    small = choose_layout(4, [FOLDER], mem_mb=460)  # a Pi Zero 2 W: 4 cores, 512 MB
    assert (small.interpreters, small.threads) == (1, 4) and "460 MB of RAM" in small.reason
    mid = choose_layout(4, [FOLDER], mem_mb=1024)
    assert (mid.interpreters, mid.threads) == (2, 2) and "2 for 1024 MB of RAM" in mid.reason
    assert choose_layout(4, [FOLDER], mem_mb=8192).interpreters == 4
    assert choose_layout(64, [FOLDER]).interpreters == layout.MAX_INTERPRETERS


def test_configured_values_are_kept():
    both = choose_layout(4, [CAMERA_15], interpreters=2, threads=1)
    assert both == Layout(2, 1, "model.interpreters and model.threads set", auto=False)
    shared = choose_layout(4, [CAMERA_15], interpreters=2)
    assert (shared.interpreters, shared.threads) == (2, 2) and "model.interpreters = 2 set" in shared.reason
    def pair(got):
        return got.interpreters, got.threads

    assert pair(choose_layout(2, [FOLDER], interpreters=1)) == (1, 2)  # as before: all cores
    # threads set, interpreters automatic: as many of those interpreters as the cores hold
    assert pair(choose_layout(4, [FOLDER], threads=2)) == (2, 2)
    assert pair(choose_layout(2, [FOLDER], threads=2)) == (1, 2)
    assert pair(choose_layout(4, [CAMERA_15], threads=3)) == (1, 3)


def test_for_config_reads_the_sources_kind_fps_and_liveness():
    def chosen(*overrides):
        return for_config(load_config(None, list(overrides), env={}), cpus=2, mem_mb=4096)

    assert chosen("source.kind=folder", "source.uri=/tmp").interpreters == 2
    assert chosen("source.kind=synthetic", "source.fps=10").interpreters == 1
    assert chosen("source.kind=synthetic").interpreters == 2
    assert chosen("source.kind=opencv", "source.uri=rtsp://u:p@cam/s", "source.fps=10").interpreters == 1
    assert "opencv source read at full speed" in chosen("source.kind=opencv", "source.uri=/v/clip.avi").reason
    assert chosen("source.kind=folder", "source.uri=/tmp", "model.interpreters=1").interpreters == 1
    assert chosen("source.kind=folder", "model.edgetpu=usb").interpreters == 1


# -- the agent ------------------------------------------------------------------------------------

def agent_for(tmp_path, monkeypatch, *overrides):
    monkeypatch.setattr(layout, "cpu_count", lambda: 2)  # the same choice on a bigger machine
    monkeypatch.setattr(layout, "memory_mb", lambda: 4096)
    cfg = load_config(None, [f"model.path={DM05}", "mqtt.enabled=false", f"agent.state_dir={tmp_path}",
                             *overrides], env={})
    assert (cfg.model.interpreters, cfg.model.threads) == (0, 0)  # the defaults: automatic
    return Agent(cfg, install_signals=False)


def run_and_read_info(agent):
    agent.start_pipeline()
    try:
        assert agent.pipeline is not None, agent.error
        wait_until(lambda: agent.comms.published > 0, timeout=60, what="a frame through the pipeline")
        return agent.info(), len(agent.pipeline._workers)
    finally:
        agent.stop_pipeline()


def test_agent_with_defaults_on_a_folder_runs_one_interpreter_per_core(tmp_path, monkeypatch, caplog):
    caplog.set_level(logging.INFO, logger="edge_agent.inference.layout")
    agent = agent_for(tmp_path, monkeypatch, "source.kind=folder", f"source.uri={IMAGES / 'cat_720p.jpg'}")
    info, workers = run_and_read_info(agent)
    assert info["layout"] == {"interpreters": 2, "threads": 1, "auto": True,
                              "reason": "folder source read at full speed (fps = 0): frames come as fast as "
                                        "they are served: one interpreter per core, frames side by side"}
    assert info["interpreters"] == 2 and info["threads"] == 1  # what the interpreters really run with
    assert workers == 2
    assert "inference layout: 2 interpreters x 1 thread (automatic: folder source read at full speed" in caplog.text


def test_agent_with_defaults_on_a_paced_camera_runs_one_interpreter_on_all_cores(tmp_path, monkeypatch):
    agent = agent_for(tmp_path, monkeypatch, "source.kind=synthetic", "source.fps=10")
    info, workers = run_and_read_info(agent)
    assert (info["layout"]["interpreters"], info["layout"]["threads"]) == (1, 2)
    assert info["layout"]["reason"].startswith("latency: one paced camera (synthetic at 10 fps)")
    assert info["interpreters"] == 1 and info["threads"] == 2 and workers == 1


def test_explicit_layout_is_kept_and_said_so(tmp_path, monkeypatch):
    monkeypatch.setattr(layout, "cpu_count", lambda: 2)
    cfg = load_config(None, [f"model.path={DM05}", "mqtt.enabled=false", f"agent.state_dir={tmp_path}",
                             "source.kind=folder", f"source.uri={IMAGES / 'cat_720p.jpg'}",
                             "model.interpreters=1", "model.threads=2"], env={})
    agent = Agent(cfg, install_signals=False)
    info, workers = run_and_read_info(agent)
    assert info["layout"] == {"interpreters": 1, "threads": 2, "auto": False,
                              "reason": "model.interpreters and model.threads set"}
    assert workers == 1 and info["threads"] == 2
