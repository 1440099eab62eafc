"""``config check`` names every problem at once, and finds every refusal ``run`` makes at start.

The parity test drives both over one table of bad configs: the real daemon (``edge-agent run``,
MQTT off) must log the refusal, and ``config check`` must exit 2 naming the same problem.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
from typing import List

import pytest

from edge_agent.cli import main
from tests.data import CLASSIFIER, DM05, IMAGES, LABELS

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "edge_agent" / "data" / "config.example.toml"


def check(capsys, path: Path, *extra: str) -> tuple:
    """``edge-agent config check`` in-process: (exit code, its stderr lines)."""
    rc = main(["config", "check", "--config", str(path), *extra])
    err = capsys.readouterr().err
    return rc, [line for line in err.splitlines() if line]


def base(tmp_path: Path) -> str:
    return f'[agent]\ndevice_id = "cfg"\nstate_dir = "{tmp_path / "state"}"\n[mqtt]\nenabled = false\n'


def test_five_mistakes_are_named_in_one_run(tmp_path, capsys):
    path = tmp_path / "five.toml"
    path.write_text(
        '[agent]\nlog_level = "loud"\n'              # 1 a bad choice
        '[source]\nfps = -1\n'                        # 2 out of range
        '[model]\nthreads = "four"\n'                 # 3 wrong type
        '[mqtt]\nport = 99999\ntopic_prefix = "$SYS/edge"\n'  # 4, 5 range, reserved prefix
        '[publsh]\nmask_every_n = 2\n')               # 6 a typo'd section
    rc, lines = check(capsys, path)
    assert rc == 2
    for key in ("agent.log_level", "source.fps", "model.threads", "mqtt.port", "mqtt.topic_prefix",
                "publsh: unknown section (did you mean 'publish'?)"):
        assert sum(key in line for line in lines) == 1, (key, lines)
    assert all(line.startswith("edge-agent: config error: ") for line in lines), lines
    assert "Traceback" not in "\n".join(lines)


def test_key_problems_and_start_up_problems_together(tmp_path, capsys):
    """A bad key in one section does not hide a missing folder or an unknown model in others."""
    path = tmp_path / "mixed.toml"
    path.write_text(base(tmp_path).replace('"cfg"', '"all"') +
                    f'[source]\nkind = "folder"\nuri = "{tmp_path / "nope"}"\n'
                    '[model]\nname = "nosuchmodel"\n'
                    f'[deploy]\npublic_key = "{tmp_path / "missing.pem"}"\n')
    rc, lines = check(capsys, path)
    text = "\n".join(lines)
    assert rc == 2
    assert "agent.device_id: 'all' is reserved" in text
    assert f"folder '{tmp_path / 'nope'}' does not exist" in text and "source.uri" in text
    assert "model.name: unknown model 'nosuchmodel'" in text
    assert "deploy.public_key" in text
    assert len(lines) == 4, lines


def test_shipped_example_is_refused_naming_the_model(capsys):
    rc, lines = check(capsys, EXAMPLE)
    assert rc == 2
    assert any("model.path: no model configured" in line for line in lines), lines
    assert any("source.uri" in line for line in lines), lines


def test_a_good_config_is_ok(tmp_path, capsys):
    path = tmp_path / "ok.toml"
    path.write_text(base(tmp_path) + f'[source]\nkind = "folder"\nuri = "{IMAGES}"\n'
                    f'[model]\npath = "{DM05}"\nlabels = "{LABELS}"\n')
    assert main(["config", "check", "--config", str(path)]) == 0
    assert "config OK" in capsys.readouterr().out


@pytest.mark.parametrize("data, what", [
    (b"\xff\xfe[\x00a\x00g\x00", "UTF-16"),
    (bytes(range(256)) * 4, "random bytes"),
])
def test_a_file_that_is_not_utf8_is_one_line(tmp_path, capsys, data, what):
    path = tmp_path / "bad.toml"
    path.write_bytes(data)
    rc, lines = check(capsys, path)
    assert rc == 2 and len(lines) == 1, (what, lines)
    assert "not UTF-8 text" in lines[0] and "Traceback" not in lines[0]


def test_a_certificate_without_its_key_names_mqtt_key_file(tmp_path, capsys):
    from tests.broker import make_certs

    certs = make_certs(tmp_path / "certs")
    path = tmp_path / "tls.toml"
    path.write_text(f'[agent]\nstate_dir = "{tmp_path}"\n[source]\nkind = "synthetic"\n'
                    f'[model]\npath = "{DM05}"\n'
                    f'[mqtt]\ntls = true\nca_file = "{certs.ca}"\ncert_file = "{certs.client_cert}"\n')
    rc, lines = check(capsys, path, "--no-model")
    assert rc == 2 and len(lines) == 1, lines
    assert "mqtt.cert_file" in lines[0] and "set mqtt.key_file" in lines[0]
    assert "PEM lib" not in lines[0]


# -- parity with `run` ------------------------------------------------------------------------------

def _run_until(config: Path, needle: str, timeout: float = 60.0) -> str:
    """The real daemon on ``config`` until its output shows ``needle`` (or it exits); its output."""
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: List[str] = []
    deadline = time.monotonic() + timeout
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends when the agent exits
            lines.append(line)
            if needle in line or time.monotonic() > deadline:
                break
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return "".join(lines)


def _start_refusals(tmp: Path) -> List[tuple]:
    """(id, config text after [agent]/[mqtt], what `run` and `check` both say)."""
    synthetic = '[source]\nkind = "synthetic"\n'
    good_model = f'[model]\npath = "{DM05}"\n'
    return [
        ("no-model", synthetic, "no model configured"),
        ("missing-folder", f'[source]\nkind = "folder"\nuri = "{tmp / "gone"}"\n' + good_model,
         "does not exist"),
        ("empty-folder-uri", '[source]\nkind = "folder"\n' + good_model, "folder source needs source.uri"),
        ("missing-video", f'[source]\nkind = "opencv"\nuri = "{tmp / "clip.avi"}"\n' + good_model,
         "does not exist"),
        ("missing-model-path", synthetic + f'[model]\npath = "{tmp / "nope.tflite"}"\n', "not found"),
        ("unknown-model-name", synthetic + '[model]\nname = "nosuchmodel"\n', "unknown model 'nosuchmodel'"),
        ("missing-labels", synthetic + good_model + f'labels = "{tmp / "labels.txt"}"\n', "labels"),
        ("not-a-segmenter", synthetic + f'[model]\npath = "{CLASSIFIER}"\n', "segmentation"),
        ("missing-public-key", synthetic + good_model + f'[deploy]\npublic_key = "{tmp / "k.pem"}"\n',
         "deploy.public_key"),
        ("normalization-twice", synthetic + good_model + 'normalization = "0..1"\ninput_mean = "1"\n'
         'input_std = "1"\n', "model.normalization"),
    ]


@pytest.mark.slow
def test_every_refusal_of_run_at_start_is_found_by_check(tmp_path, capsys):
    for name, text, needle in _start_refusals(tmp_path):
        path = tmp_path / f"{name}.toml"
        path.write_text(base(tmp_path) + text)
        out = _run_until(path, needle)
        assert needle in out, f"{name}: run did not say {needle!r}:\n{out[-2000:]}"
        rc, lines = check(capsys, path)
        assert rc == 2, f"{name}: check passed a config run refuses ({lines})"
        assert any(needle in line for line in lines), (name, lines)
