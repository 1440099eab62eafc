"""``python -m tools.host evaluate``: one command, table for float/fp16/Coral/ours + overlays."""

import csv
import subprocess
import sys

import pytest

pytestmark = pytest.mark.host
pytest.importorskip("tensorflow")

from tests.host.host_data import DM05_FLOAT_257, DM05_FP16_513, DM05_QUANT, LABELS, REPO, VOC  # noqa: E402
from tools.host.__main__ import main  # noqa: E402


def test_evaluate_float_fp16_coral_ours(dm05_ptq, tmp_path, capsys):
    out = tmp_path / "eval"
    rc = main(["evaluate", str(DM05_FP16_513), str(DM05_FLOAT_257), str(DM05_QUANT),
               str(dm05_ptq), "--voc", str(VOC), "--labels", str(LABELS), "--out", str(out)])
    printed = capsys.readouterr().out
    print(printed)
    assert rc == 0
    md = (out / "results.md").read_text()
    assert md.strip() in printed
    for name in ("deeplabv3_mnv2_dm05_513_fp16", "deeplabv3_mnv2_dm05_257_float",
                 "deeplabv3_mnv2_dm05_pascal_quant", "dm05_ptq_uint8"):
        assert f"| {name} |" in md
    assert "| bird |" in md and "| background |" in md and "agreement (%)" in md
    rows = list(csv.reader((out / "results.csv").open()))
    assert rows[0] == ["model", "metric", "class", "value"]
    miou = {r[0]: float(r[3]) for r in rows if r[1] == "miou"}
    assert len(miou) == 4 and all(0.5 < v <= 1.0 for v in miou.values())
    assert sum(1 for r in rows if r[1] == "agreement") == 6
    overlays = sorted((out / "overlays").glob("*.png"))
    assert len(overlays) == 7 * 3


def test_evaluate_errors_are_one_line(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tools.host", "evaluate", str(DM05_QUANT),
                           "--voc", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: not a VOC-layout folder")
    proc = subprocess.run([sys.executable, "-m", "tools.host", "evaluate",
                           str(tmp_path / "none.tflite"), "--voc", str(VOC)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "model file not found" in proc.stderr.splitlines()[-1]


def test_evaluate_agreement_on_unlabelled_images(tmp_path, capsys):
    from tests.host.host_data import BIRD

    rc = main(["evaluate", str(DM05_QUANT), str(DM05_QUANT), "--voc", str(VOC), "--image",
               str(BIRD), "--no-overlays", "--out", str(tmp_path)])
    assert rc == 0
    md = (tmp_path / "results.md").read_text()
    assert "| agreement on bird_segmentation (%) |" in md
    assert "| deeplabv3_mnv2_dm05_pascal_quant#0 | 100.00 | 100.00 |" in md
    rows = list(csv.reader((tmp_path / "results.csv").open()))
    assert [r[1:] for r in rows if r[1] == "image_agreement"] == [
        ["image_agreement", "bird_segmentation", "1.000000"]]
