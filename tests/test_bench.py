"""Local benchmark: statistics against numpy, run-count policy, results on the real models, CLI."""

from __future__ import annotations

import json
import math
import os
import stat

import cv2
import numpy as np
import pytest

from edge_agent.cli import build_parser
from edge_agent.output import benchmark as bench
from edge_agent.output.benchmark import BenchSettings, parse_frame_size, run_benchmark
from edge_agent.errors import EdgeAgentError, ModelError
from edge_agent.inference.segmenter import Segmenter
from edge_agent.output.timing import summarize
from tests.data import BIRD, CLASSIFIER, DM05, IMAGES, LABELS
from tests.helpers import RESULT_KEYS


# -- statistics ----------------------------------------------------------------------------------

def test_summarize_matches_numpy_on_a_known_sample():
    rng = np.random.default_rng(1234)
    sample = np.concatenate([rng.lognormal(3.5, 0.4, 997), [12.5, 250.0, 0.75]])
    s = summarize(sample.tolist())
    assert s["count"] == 1000
    assert s["min"] == pytest.approx(sample.min()) and s["max"] == pytest.approx(sample.max())
    assert s["mean"] == pytest.approx(sample.mean(), rel=1e-12)
    assert s["std"] == pytest.approx(sample.std(ddof=0), rel=1e-9)  # population std, like benchmark_model
    for q in (50, 90, 99):
        assert s[f"p{q}"] == pytest.approx(np.percentile(sample, q), rel=1e-12)


def test_summarize_by_hand():
    s = summarize([4.0, 1.0, 3.0, 2.0])
    assert s == {"count": 4, "min": 1.0, "max": 4.0, "mean": 2.5, "std": math.sqrt(1.25),
                 "p50": 2.5, "p90": pytest.approx(3.7), "p99": pytest.approx(3.97)}
    assert summarize([7.0])["p99"] == 7.0 and summarize([])["count"] == 0


@pytest.mark.parametrize("text, expected", [("640x480", (640, 480)), ("16x8192", (16, 8192)), (" 1280X720 ", (1280, 720))])
def test_parse_frame_size(text, expected):
    assert parse_frame_size(text) == expected


@pytest.mark.parametrize("text", ["640", "640x", "x480", "15x480", "640x8193", "-640x480", "640*480", "1e3x480"])
def test_parse_frame_size_refuses(text):
    with pytest.raises(ValueError, match="frame size"):
        parse_frame_size(text)


# -- the run-count policy of benchmark_model (a fake clock: no timing assumptions) ----------------

class FakeClock:
    def __init__(self, step: float) -> None:
        self.t, self.step = 0.0, step

    def __call__(self) -> float:
        return self.t

    def advance(self) -> None:
        self.t += self.step


@pytest.mark.parametrize("settings, step, runs, stopped", [
    (BenchSettings(runs=5), 0.125, 5, "runs"),
    (BenchSettings(runs=2, min_secs=1.0), 0.125, 8, "min_secs"),  # min_secs extends the runs
    (BenchSettings(runs=100, max_secs=0.5), 0.125, 4, "max_secs"),  # max_secs cuts them short
    (BenchSettings(runs=1, min_secs=100.0, max_count=7), 0.125, 7, "max_count"),
])
def test_run_count_policy(settings, step, runs, stopped):
    clock = FakeClock(step)
    policy = bench._Clock(settings, clock)
    done, reason = 0, None
    while reason is None:
        clock.advance()
        done += 1
        reason = policy.stop_reason(done)
    assert (done, reason) == (runs, stopped)


# -- real model ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def dm05():
    return Segmenter(str(DM05), labels=str(LABELS))


def test_invoke_benchmark_on_the_real_model(dm05):
    progress = []
    result = run_benchmark(dm05, BenchSettings(runs=4, warmup=2), init_ms=12.5,
                           progress=lambda *a: progress.append(a))
    assert set(result) == RESULT_KEYS
    assert result["schema"] == bench.RESULT_SCHEMA and result["device_id"] is None
    assert result["model"]["sha256"] == __import__("hashlib").sha256(DM05.read_bytes()).hexdigest()
    assert result["model"]["input_size"] == [513, 513] and result["runtime"] and result["threads"] >= 1
    assert result["init_ms"] == 12.5 and result["first_inference_ms"] > 0 and result["warmup_avg_ms"] > 0
    inv = result["invoke"]
    assert inv["count"] == 4 and len(result["samples_ms"]) == 4 and result["stopped"] == "runs"
    assert inv["min"] <= inv["p50"] <= inv["p90"] <= inv["p99"] <= inv["max"]
    again = summarize(result["samples_ms"])  # the summary is the summary of the reported samples
    for key in ("min", "max", "mean", "p50", "p99"):
        assert again[key] == pytest.approx(inv[key], abs=2e-3)
    assert result["fps"] == pytest.approx(1000.0 / inv["mean"], rel=1e-3)
    assert result["stages"] is None and result["settings"]["frame_size"] == [640, 480]
    assert result["peak_rss_mb"] > 10 and result["device"]["board"] and result["device"]["cpu_count"] >= 1
    assert progress[:2] == [("warmup", 1, 2), ("warmup", 2, 2)] and progress[-1] == ("runs", 4, 4)
    json.dumps(result, allow_nan=False)  # publishable as is


def test_pipeline_benchmark_times_every_stage(dm05):
    result = run_benchmark(dm05, BenchSettings(runs=3, warmup=0, pipeline=True, frame_size=(320, 240),
                                               input="pattern", samples=False))
    stages = result["stages"]
    assert list(stages) == list(bench.STAGES) and all(s["count"] == 3 for s in stages.values())
    assert list(stages) == ["preprocess", "inference", "postprocess", "encode", "end_to_end"]
    # inference = copy in + invoke() + label map out: never less than invoke() alone, run by run
    assert result["invoke"]["count"] == 3 and stages["inference"]["min"] >= result["invoke"]["min"]
    assert stages["inference"]["mean"] >= result["invoke"]["mean"] and result["samples_ms"] is None
    parts = sum(stages[k]["mean"] for k in ("preprocess", "inference", "postprocess", "encode"))
    assert parts == pytest.approx(stages["end_to_end"]["mean"], abs=1e-2)  # end to end = sum of stages
    assert result["fps"] == pytest.approx(1000.0 / stages["end_to_end"]["mean"], rel=1e-3)
    assert result["settings"]["frame_size"] == [320, 240] and result["warmup_avg_ms"] is None


def test_min_and_max_secs_on_the_real_model(dm05):
    cut = run_benchmark(dm05, BenchSettings(runs=1000, warmup=0, max_secs=1e-6))
    assert cut["invoke"]["count"] == 1 and cut["stopped"] == "max_secs"
    ticks = iter(i * 0.0625 for i in range(10 ** 6))  # a clock that advances per reading: any runtime speed
    longer = run_benchmark(dm05, BenchSettings(runs=1, warmup=0, min_secs=1.0), now=lambda: next(ticks))
    assert longer["stopped"] == "min_secs" and longer["invoke"]["count"] > 1 and longer["duration_s"] >= 1.0
    assert set(longer["samples_ms"]) == {62.5}  # each invoke timed between two readings


def test_inputs_image_folder_and_errors(tmp_path):
    image = bench.load_inputs(str(BIRD))
    assert len(image) == 1 and image[0].ndim == 3 and image[0].dtype == np.uint8
    resized = bench.load_inputs(str(BIRD), (200, 100))
    assert resized[0].shape == (100, 200, 3)
    folder = tmp_path / "frames"
    folder.mkdir()
    for name in ("a.jpg", "b.png"):
        cv2.imwrite(str(folder / name), cv2.imread(str(IMAGES / "cat_720p.jpg")))
    (folder / "notes.txt").write_text("not an image")
    assert len(bench.load_inputs(str(folder))) == 2
    random_a, random_b = bench.load_inputs("random"), bench.load_inputs("random")
    assert random_a[0].shape == (480, 640, 3) and np.array_equal(random_a[0], random_b[0])  # seeded
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EdgeAgentError, match="no images"):
        bench.load_inputs(str(empty))
    with pytest.raises(EdgeAgentError, match="--input 'nowhere'"):
        bench.load_inputs("nowhere")
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    with pytest.raises(EdgeAgentError, match="not a readable image"):
        bench.load_inputs(str(tmp_path / "bad.jpg"))


def test_throttling_flags_from_vcgencmd(dm05, tmp_path, monkeypatch):
    """A stand-in vcgencmd (absent hardware) on PATH: the result reports its flags before/after."""
    tool = tmp_path / "vcgencmd"
    tool.write_text("#!/bin/sh\necho throttled=0x50005\n")
    tool.chmod(tool.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    device = run_benchmark(dm05, BenchSettings(runs=1, warmup=0))["device"]
    for key in ("throttled_before", "throttled_after"):
        flags = device[key]
        assert flags["raw"] == "0x50005" and flags["under_voltage"] and flags["throttled"]
        assert flags["under_voltage_occurred"] and flags["throttling_occurred"] and not flags["freq_capped"]
    assert "cpu_temp_c_before" in device and "cpu_temp_c_after" in device


# -- CLI -----------------------------------------------------------------------------------------------

def run_cli(argv):
    args = build_parser().parse_args(["bench", *argv])
    return args.func(args)


def test_cli_json_to_stdout(capsys):
    assert run_cli(["--model", str(DM05), "--runs", "2", "--warmup", "0", "--input", str(BIRD), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert set(result) == RESULT_KEYS and result["invoke"]["count"] == 2
    assert result["settings"]["input"] == str(BIRD) and result["init_ms"] > 0
    assert result["settings"]["frame_size"] == [cv2.imread(str(BIRD)).shape[1], cv2.imread(str(BIRD)).shape[0]]


def test_cli_text_report_and_json_file(capsys, tmp_path):
    out = tmp_path / "r.json"
    assert run_cli(["--model", str(DM05), "--runs", "2", "--pipeline", "--frame-size", "320x240",
                    "--json", str(out)]) == 0
    text = capsys.readouterr().out
    saved = json.loads(out.read_text())
    for line in ("Initialization:", "First inference:", "Warmup (1 runs): avg", "Inference timings: count=2",
                 "Pipeline stages at 320x240", "end_to_end", "Peak RSS:", "Runtime: "):
        assert line in text, text
    assert f"p50={saved['invoke']['p50']:.2f}" in text and saved["stages"]["encode"]["count"] == 2


def test_cli_errors_are_one_line(tmp_path):
    with pytest.raises(EdgeAgentError, match="--input 'missing.png'"):  # checked before loading the model
        run_cli(["--model", str(tmp_path / "absent.tflite"), "--input", "missing.png"])
    with pytest.raises(ModelError, match="not a segmentation model"):
        run_cli(["--model", str(CLASSIFIER), "--runs", "1"])
    with pytest.raises(EdgeAgentError, match="--runs must be >= 1"):
        run_cli(["--model", str(DM05), "--runs", "0"])
    with pytest.raises(SystemExit):
        run_cli(["--model", str(DM05), "--frame-size", "big"])


def test_registered_in_the_cli(capsys):
    from edge_agent.cli import main

    assert main(["bench", "--model", str(DM05), "--runs", "1", "--warmup", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["invoke"]["count"] == 1
    assert main(["bench", "--model", str(CLASSIFIER), "--runs", "1"]) == ModelError.exit_code
    err = capsys.readouterr().err.strip()
    assert err.startswith("edge-agent: error: ") and "not a segmentation model" in err and "\n" not in err
