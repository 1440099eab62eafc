"""Architecture checks for the aarch64 run (tools/test-arm64.sh); they also run on x86_64.

tools/test-arm64.sh exports EDGE_AGENT_EXPECT_MACHINE=aarch64 and EDGE_AGENT_RUNTIME=<runtime>
inside the emulated root, so these tests prove that the suite really ran on aarch64 with the
requested runtime (a silent fallback to another runtime would otherwise pass unnoticed).

Masks differ slightly between x86_64 and aarch64 (XNNPACK picks other kernels: a few hundred to
~2000 of 263169 pixels) and between runtimes, so results are compared with tolerances, never
for equality.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Dict

import pytest

from edge_agent.inference.runtimes import resolve
from edge_agent.inference.segmenter import Segmenter
from tests.data import DM05, DM10, IMAGES, LABELS, bird_513, rgb

EXPECTED_MACHINE = os.environ.get("EDGE_AGENT_EXPECT_MACHINE")
EXPECTED_PYTHON = os.environ.get("EDGE_AGENT_EXPECT_PYTHON")  # "3.11" bookworm, "3.13" trixie
REQUESTED_RUNTIME = os.environ.get("EDGE_AGENT_RUNTIME")

# Dominant-class fraction per (model, image), measured on x86_64 with ai-edge-litert 2.3.
X86_REFERENCE: Dict[tuple, Dict[str, float]] = {
    ("dm10", "bird"): {"bird": 0.2119},
    ("dm10", "cat_720p"): {"cat": 0.4561},
    ("dm05", "bird"): {"bird": 0.1707},
    ("dm05", "cat_720p"): {"cat": 0.4319},
}
# Measured spread: <= 0.005 across architectures, <= 0.011 between litert and tflite-runtime.
# A swapped channel order or a wrong letterbox geometry moves these fractions far more.
FRACTION_TOLERANCE = 0.02

MODELS = {"dm10": DM10, "dm05": DM05}


@pytest.fixture(scope="module")
def segmenters() -> Dict[str, Segmenter]:
    return {name: Segmenter(str(path), labels=str(LABELS)) for name, path in MODELS.items()}


def frame(name: str):
    """The golden bird at 513x513 (square), or a real 1280x720 photo (letterboxed)."""
    return bird_513() if name == "bird" else rgb(IMAGES / f"{name}.jpg")


@pytest.mark.skipif(not EXPECTED_MACHINE, reason="EDGE_AGENT_EXPECT_MACHINE not set (set by tools/test-arm64.sh)")
def test_runs_on_the_expected_machine():
    print(f"platform.machine() = {platform.machine()}")
    assert platform.machine() == EXPECTED_MACHINE


@pytest.mark.skipif(not EXPECTED_PYTHON, reason="EDGE_AGENT_EXPECT_PYTHON not set (set by tools/test-arm64.sh)")
def test_runs_on_the_expected_python():
    assert "%d.%d" % sys.version_info[:2] == EXPECTED_PYTHON


@pytest.mark.skipif(not REQUESTED_RUNTIME, reason="EDGE_AGENT_RUNTIME not set")
def test_the_requested_runtime_runs_the_model(segmenters):
    info = segmenters["dm05"].info()
    print(f"{platform.machine()}: {segmenters['dm05'].describe_runtime()}")
    assert info["runtime"] == resolve(REQUESTED_RUNTIME).name
    assert info["delegate"] is None  # CPU: no Edge TPU here


@pytest.mark.parametrize("model,image", sorted(X86_REFERENCE), ids=lambda v: str(v))
def test_class_fractions_match_the_x86_reference(segmenters, model, image):
    fractions = segmenters[model].segment(frame(image)).class_fractions()
    for label, expected in X86_REFERENCE[(model, image)].items():
        got = fractions.get(label, 0.0)
        print(f"{platform.machine()} {model} {image}: {label} {got:.4f} (x86_64 {expected:.4f})")
        assert abs(got - expected) <= FRACTION_TOLERANCE, (model, image, label, got, expected)
    assert max(fractions, key=fractions.get) == "background"
