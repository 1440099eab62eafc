"""The model manifest and `edge-agent models fetch` (offline through --mirror)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from edge_agent.models import catalog
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


@pytest.fixture
def http_models():
    """A real HTTP server on loopback serving the shared models folder."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    handler = functools.partial(Quiet, directory=str(MODELS))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _manifest_with_base(tmp_path, base: str):
    doc = json.loads(open(catalog.load_manifest().path).read())
    for entry in doc["models"]:
        entry["url"] = f"{base}/{entry['file']}"
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(doc))
    return path


def test_fetch_downloads_over_http_and_verifies(tmp_path, http_models):
    manifest = _manifest_with_base(tmp_path, http_models)
    dest = tmp_path / "models"
    proc = run_cli("models", "fetch", "deeplabv3_mnv2_dm05_pascal_quant", "--manifest", str(manifest),
                   "--dest", str(dest))
    assert proc.returncode == 0, proc.stderr
    # not a terminal: progress as whole lines on stderr, the last one at 100 %
    assert proc.stderr.splitlines()[-1] == "deeplabv3_mnv2_dm05_pascal_quant: 0.8 / 0.8 MB (100%)"
    assert catalog.sha256_file(str(dest / "deeplabv3_mnv2_dm05_pascal_quant.tflite")) == \
        catalog.parse_manifest(str(manifest)).get("deeplabv3_mnv2_dm05_pascal_quant").sha256
    # a second fetch finds the verified copy and does not download again
    again = run_cli("models", "fetch", "deeplabv3_mnv2_dm05_pascal_quant", "--manifest", str(manifest),
                    "--dest", str(dest))
    assert again.returncode == 0


def test_fetch_http_errors_are_one_line_and_leave_nothing(tmp_path, http_models):
    manifest = _manifest_with_base(tmp_path, http_models + "/missing")
    dest = tmp_path / "models"
    proc = run_cli("models", "fetch", "deeplabv3_mnv2_dm05_pascal_quant", "--manifest", str(manifest),
                   "--dest", str(dest))
    assert proc.returncode == 2 and "cannot download" in proc.stderr and "404" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert list(dest.iterdir()) == []


def test_fetch_refuses_oversized_downloads(tmp_path, http_models, monkeypatch):
    manifest = catalog.parse_manifest(str(_manifest_with_base(tmp_path, http_models)))
    monkeypatch.setattr(catalog, "MAX_DOWNLOAD_BYTES", 1000)
    with pytest.raises(ModelError, match="larger than 1000 bytes"):
        catalog.fetch(manifest.get("deeplabv3_mnv2_dm05_pascal_quant"), dest=str(tmp_path / "m"))
    assert list((tmp_path / "m").iterdir()) == []


def test_progress_lines_are_throttled_and_end_at_100_percent():
    now = [0.0]
    lines = []
    progress = catalog.ProgressLog("m", lines.append, every_s=2.0, clock=lambda: now[0])
    for done in range(0, 8_000_001, 65536):  # 8 MB in 64 KiB blocks over 12 s
        now[0] = done / 8e6 * 12
        progress(done, 8_000_000)
    progress(8_000_000, 8_000_000)
    assert lines[0] == "m: 0.0 / 8.0 MB (0%)" and lines[-1] == "m: 8.0 / 8.0 MB (100%)"
    assert 6 <= len(lines) <= 8  # one every 2 s of 12 s, plus the last, never a line per block
    assert sum(line.endswith("(100%)") for line in lines) == 1
