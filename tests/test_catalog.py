"""The model manifest and `edge-agent models fetch` (offline through --mirror)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_agent import catalog
from edge_agent.errors import ModelError
from tests.data import MODELS, SHARED


def run_cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "edge_agent", *args],
                          capture_output=True, text=True, timeout=120, env=env)


def test_manifest_matches_the_real_files():
    manifest = catalog.load_manifest()
    assert manifest.default in manifest.models
    sums = {}
    for line in (SHARED / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        sums[name.replace("./models/", "")] = digest
    for entry in manifest.models.values():
        assert entry.url.startswith("https://") and entry.file in entry.url
        assert sums[entry.file] == entry.sha256
        assert len(entry.labels) == 21 and entry.labels[0] == "background"
        if entry.edgetpu:
            assert entry.cpu_twin in manifest.models


def test_fetch_from_mirror_verifies_and_resolves(tmp_path):
    dest = tmp_path / "models"
    proc = run_cli("models", "fetch", "deeplabv3_mnv2_dm05_pascal_quant",
                   "--mirror", str(MODELS), "--dest", str(dest))
    assert proc.returncode == 0, proc.stderr
    assert "sha256 ok" in proc.stdout
    assert (dest / "deeplabv3_mnv2_dm05_pascal_quant.tflite").is_file()
    resolved = catalog.resolve("deeplabv3_mnv2_dm05_pascal_quant", dest=str(dest))
    assert resolved.labels[3] == "bird"
    listing = run_cli("models", "list", "--dest", str(dest))
    assert "* deeplabv3_mnv2_dm05_pascal_quant " in listing.stdout


def test_wrong_hash_is_refused_and_nothing_is_kept(tmp_path):
    doc = json.loads(catalog.load_manifest().path and open(catalog.load_manifest().path).read())
    doc["models"][0]["sha256"] = "0" * 64
    bad = tmp_path / "manifest.json"
    bad.write_text(json.dumps(doc))
    dest = tmp_path / "models"
    proc = run_cli("models", "fetch", doc["models"][0]["name"], "--manifest", str(bad),
                   "--mirror", str(MODELS), "--dest", str(dest))
    assert proc.returncode == 2
    assert "sha256 mismatch" in proc.stderr and "Traceback" not in proc.stderr
    assert list(dest.iterdir()) == []


def test_unknown_name_and_missing_mirror_file(tmp_path):
    proc = run_cli("models", "fetch", "resnet", "--mirror", str(MODELS), "--dest", str(tmp_path))
    assert proc.returncode == 2 and "unknown model 'resnet'" in proc.stderr
    with pytest.raises(ModelError, match="not found in the mirror"):
        catalog.fetch(catalog.load_manifest().get("deeplabv3_mnv2_pascal_quant"),
                      dest=str(tmp_path), mirror=str(tmp_path))


def test_unfetched_name_says_how_to_fetch(tmp_path):
    with pytest.raises(ModelError, match="edge-agent models fetch"):
        catalog.resolve("deeplabv3_mnv2_pascal_quant", dest=str(tmp_path))


def test_segment_by_manifest_name_uses_manifest_labels(tmp_path):
    dest = tmp_path / "models"
    catalog.fetch(catalog.load_manifest().get("deeplabv3_mnv2_dm05_pascal_quant"),
                  dest=str(dest), mirror=str(MODELS))
    env = dict(__import__("os").environ, EDGE_AGENT_MODELS_DIR=str(dest))
    proc = run_cli("segment", str(SHARED / "images" / "bird_segmentation.bmp"),
                   "--model", "deeplabv3_mnv2_dm05_pascal_quant", "--out", str(tmp_path / "o"), env=env)
    assert proc.returncode == 0, proc.stderr
    assert "bird" in proc.stdout
