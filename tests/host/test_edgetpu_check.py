"""Edge TPU check: op/dtype analysis always; edgetpu_compiler only when installed."""

import shutil

import pytest

pytestmark = pytest.mark.host
pytest.importorskip("tensorflow")

from tests.host.host_data import DM05_FP16_513, DM05_QUANT, MODELS  # noqa: E402
from tools.host.__main__ import main  # noqa: E402
from tools.host.edgetpu_check import check  # noqa: E402


def test_coral_quant_maps_fully():
    report = check(DM05_QUANT, compile_model=False)
    assert report.op_counts["DEPTHWISE_CONV_2D"] == 17 and not report.errors
    assert "maps fully" in report.text()


def test_float_model_with_space_to_batch_is_flagged():
    report = check(DM05_FP16_513, compile_model=False)
    messages = " ".join(str(f) for f in report.errors)
    assert "SPACE_TO_BATCH_ND is not supported" in messages
    assert "float activations" in messages and "DEQUANTIZE of weights" in messages


def test_compiled_model_is_recognised():
    report = check(MODELS / "deeplabv3_mnv2_dm05_pascal_quant_edgetpu.tflite",
                   compile_model=False)
    assert any("already compiled" in str(f) for f in report.findings)


@pytest.mark.skipif(shutil.which("edgetpu_compiler") is not None,
                    reason="edgetpu_compiler installed: the skip message does not apply")
def test_cli_skips_missing_compiler_cleanly_and_strict_fails_on_errors(capsys):
    assert main(["edgetpu-check", str(DM05_QUANT)]) == 0
    out = capsys.readouterr().out
    assert "edgetpu_compiler: not installed" in out and "skipped" in out
    assert main(["edgetpu-check", "--strict", "--no-compile", str(DM05_FP16_513)]) == 1
    assert main(["edgetpu-check", str(MODELS / "nope.tflite")]) != 0
    assert capsys.readouterr().err.strip().startswith("error: cannot read model")
