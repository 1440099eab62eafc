"""Platform smoke check for the arm64 run: the raw TFLite runtime reproduces the golden bird mask.

It deliberately bypasses the agent's inference path (runtime wrappers, preprocessing, segmenter)
and drives the raw ``Interpreter``: if this fails, the aarch64 wheels / emulator are at fault, not
the project code, and the project tests that follow would only repeat the failure. Only the score,
``edge_agent.inference.postprocess.agreement`` (the package is installed in the root's venvs before
this runs), comes from the project, so the platform is judged by the same formula as the tests.

    python golden_check.py TEST_DATA_DIR        (runtime from $EDGE_AGENT_RUNTIME: litert | tflite-runtime)

Prints the machine, versions and, per model, agreement = equal / (2*size - equal) against the
reference mask; exit 1 unless every agreement is > 0.90 (libcoral's golden threshold).
"""

from __future__ import annotations

import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Tuple

import cv2
import numpy as np

from edge_agent.inference.postprocess import agreement

MODELS = ("deeplabv3_mnv2_pascal_quant", "deeplabv3_mnv2_dm05_pascal_quant")
THRESHOLD = 0.90


def load_runtime(name: str) -> Tuple[Any, str]:
    """(Interpreter class, version) of the named runtime, imported directly."""
    if name == "tflite-runtime":
        import tflite_runtime
        from tflite_runtime.interpreter import Interpreter
        return Interpreter, tflite_runtime.__version__
    import ai_edge_litert
    from ai_edge_litert.interpreter import Interpreter
    return Interpreter, getattr(ai_edge_litert, "__version__", "?")


def segment(interpreter_cls: Any, model: Path, image: np.ndarray) -> np.ndarray:
    """Class-id mask (uint8) of one 513x513 RGB uint8 image."""
    it = interpreter_cls(model_path=str(model), num_threads=2)
    it.allocate_tensors()
    inp, out = it.get_input_details()[0], it.get_output_details()[0]
    it.set_tensor(inp["index"], image[None].astype(inp["dtype"]))
    it.invoke()
    return np.asarray(it.get_tensor(out["index"])[0]).astype(np.uint8)


def main(argv: list) -> int:
    data = Path(argv[1])
    runtime = os.environ.get("EDGE_AGENT_RUNTIME", "litert")
    interpreter_cls, version = load_runtime(runtime)
    bgr = cv2.imread(str(data / "images" / "bird_segmentation.bmp"), cv2.IMREAD_COLOR)
    image = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), (513, 513))
    reference = cv2.imread(str(data / "images" / "bird_segmentation_mask.bmp"), cv2.IMREAD_GRAYSCALE)
    print(f"machine={platform.machine()} python={platform.python_version()} "
          f"glibc={'-'.join(platform.libc_ver())} numpy={np.__version__} opencv={cv2.__version__} "
          f"runtime={runtime} {version}")
    ok = True
    for name in MODELS:
        start = time.perf_counter()
        mask = segment(interpreter_cls, data / "models" / f"{name}.tflite", image)
        score = agreement(mask, reference)
        ok &= score > THRESHOLD
        print(f"golden {name}: agreement {score:.4f} ({int(np.count_nonzero(mask != reference))} px differ), "
              f"{time.perf_counter() - start:.1f} s -> {'ok' if score > THRESHOLD else 'FAIL'}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
