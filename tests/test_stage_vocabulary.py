"""One stage vocabulary: the segmenter, the pipeline, ``bench --pipeline``, the ``timings`` messages
and docs/asyncapi.yaml use the same stage names (edge_agent/output/stages.py), in the same order."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, List, Tuple

import pytest

from edge_agent.output import stages
from edge_agent.output.benchmark import BenchSettings, run_benchmark
from edge_agent.daemon.pipeline import Pipeline, PipelineSettings
from edge_agent.inference.segmenter import Segmenter
from edge_agent.sources import open_source
from tests.data import BIRD, DM05, IMAGES, LABELS, rgb

yaml = pytest.importorskip("yaml")
DOC = Path(__file__).resolve().parents[1] / "docs" / "asyncapi.yaml"


class ListSink:
    def __init__(self) -> None:
        self.messages: List[Tuple[str, Any]] = []

    def publish(self, suffix, payload, qos=None, retain=False) -> bool:
        self.messages.append((suffix, payload))
        return True

    def docs(self, suffix: str) -> List[dict]:
        return [json.loads(p) for s, p in self.messages if s == suffix]


@pytest.fixture(scope="module")
def segmenter():
    return Segmenter(str(DM05), labels=str(LABELS))


@pytest.fixture(scope="module")
def schemas():
    return yaml.safe_load(DOC.read_text())["components"]["schemas"]


@pytest.fixture(scope="module")
def pipeline_run(segmenter):
    """A real pipeline on a finite folder source, timings per frame, run to the end."""
    source = open_source({"kind": "folder", "uri": str(IMAGES), "loop": False})
    sink = ListSink()
    settings = PipelineSettings(timings="frame", lossless=True, stats_interval_s=3600)
    pipeline = Pipeline(source, segmenter, sink, settings).start()
    try:
        assert pipeline.wait_finished(120), pipeline.stats()
    finally:
        pipeline.stop()
    return sink


def in_vocabulary_order(keys) -> bool:
    keys = list(keys)
    return keys == [k for k in stages.PIPELINE_STAGES if k in keys]


def test_subsets_follow_the_one_vocabulary():
    for subset in (stages.SEGMENT_STAGES, stages.BENCH_STAGES):
        assert set(subset) <= set(stages.PIPELINE_STAGES) and in_vocabulary_order(subset)


def test_segmenter_timings_are_the_segment_stages(segmenter):
    result = segmenter.segment(rgb(BIRD))
    assert tuple(result.timings) == stages.SEGMENT_STAGES and all(v > 0 for v in result.timings.values())


def test_pipeline_timings_are_every_pipeline_stage(pipeline_run):
    per_frame = pipeline_run.docs("timings")
    frames = [d for d in per_frame if "seq" in d]
    assert len(frames) >= 2
    for doc in frames:
        assert tuple(doc["ms"]) == stages.PIPELINE_STAGES, doc
    interval = [d for d in per_frame if "stages" in d]  # the end-of-stream summary
    assert interval and list(interval[-1]["stages"]) == list(stages.PIPELINE_STAGES)


def test_bench_pipeline_stages_are_the_bench_stages(segmenter):
    result = run_benchmark(segmenter, BenchSettings(runs=2, warmup=0, pipeline=True, frame_size=(64, 48),
                                                    input="pattern", samples=False))
    assert tuple(result["stages"]) == stages.BENCH_STAGES


def test_asyncapi_documents_the_vocabulary(schemas):
    assert tuple(schemas["stages"]["properties"]) == stages.PIPELINE_STAGES
    reply = yaml.safe_load(DOC.read_text())["components"]["messages"]["benchmarkResult"]
    bench_stages = _find(reply, "stages")
    assert tuple(bench_stages["propertyNames"]["enum"]) == stages.BENCH_STAGES


def test_asyncapi_timings_and_stats_are_what_telemetry_sends(pipeline_run, schemas):
    docs = pipeline_run.docs("timings")
    frame = next(d for d in docs if "seq" in d)
    interval = next(d for d in docs if "stages" in d)
    # "camera" is there only for a camera of [[cameras]] (this pipeline runs the one camera "")
    assert set(frame) == set(schemas["timingsFrame"]["properties"]) - {"camera"}
    assert set(interval) == set(schemas["timingsInterval"]["properties"]) - {"camera"}
    assert set(interval["dropped"]) == set(schemas["dropped"]["properties"])
    stats = pipeline_run.docs("stats")[-1]
    documented = schemas["stats"]["properties"]
    assert set(stats) <= set(documented), set(stats) - set(documented)
    assert set(stats["frames"]) == set(documented["frames"]["properties"])


def _find(node: Any, key: str) -> Any:
    """The first mapping value under ``key`` anywhere in ``node`` (depth first)."""
    if isinstance(node, dict):
        if key in node and isinstance(node[key], dict):
            return node[key]
        for value in node.values():
            found = _find(value, key)
            if found is not None:
                return found
    elif isinstance(node, list):
        for value in node:
            found = _find(value, key)
            if found is not None:
                return found
    return None
