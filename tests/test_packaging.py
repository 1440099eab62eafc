"""What a user meets outside the happy path of a checkout: a quiet CLI, picamera2 that cannot be
imported, every EDGE_AGENT_* variable the README names, manifest names everywhere a model is taken.

All through the real command line in a subprocess with the real environment (plus the variable
under test), as a user types it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

from edge_agent.errors import SourceError
from tests.data import BIRD, DM05, DM05_EDGETPU, MODELS, REPO

DM05_NAME = "deeplabv3_mnv2_dm05_pascal_quant"


def cli(*args: str, env=None, cwd=None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "edge_agent", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, cwd=cwd, timeout=timeout)


def refused_in_one_line(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


# -- a quiet CLI ----------------------------------------------------------------------------------

RAW_INTERPRETER = textwrap.dedent("""
    import sys
    from edge_agent.inference import runtimes
    Interpreter = runtimes.resolve("auto").interpreter()
    it = Interpreter(model_path=sys.argv[1], num_threads=1)
    it.allocate_tensors()
""")


def test_runtime_info_chatter_only_with_verbose(tmp_path):
    # What the runtime itself writes to fd 2 when an interpreter is created, without our filter.
    raw = subprocess.run([sys.executable, "-c", RAW_INTERPRETER, str(DM05)], capture_output=True, text=True)
    assert raw.returncode == 0, raw.stderr
    chatter = [line for line in raw.stderr.splitlines() if line.startswith("INFO: ")]
    if not chatter:
        pytest.skip("this runtime writes no INFO line while creating an interpreter")
    quiet = cli("segment", str(BIRD), "-m", str(DM05), "--out", str(tmp_path / "q"))
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stderr == "", quiet.stderr
    verbose = cli("-vv", "segment", str(BIRD), "-m", str(DM05), "--out", str(tmp_path / "v"))
    assert verbose.returncode == 0, verbose.stderr
    assert f"DEBUG edge_agent.inference.runtimes: runtime: {chatter[0]}" in verbose.stderr
    assert not any(line.startswith("INFO: ") for line in verbose.stderr.splitlines())


def test_native_errors_still_reach_stderr():
    """Only INFO lines are held back: a native warning written during creation is passed on."""
    code = textwrap.dedent("""
        import os
        from edge_agent.inference.runtimes import native_stderr_filtered
        with native_stderr_filtered():
            os.write(2, b"INFO: chatter\\nERROR: something real\\n")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0
    assert proc.stderr == "ERROR: something real\n"


# -- picamera2 that cannot be imported --------------------------------------------------------------

NUMPY_ABI_ERROR = ("numpy.dtype size changed, may indicate binary incompatibility. "
                   "Expected 96 from C header, got 88 from PyObject")


@pytest.fixture
def broken_picamera2(tmp_path, monkeypatch):
    """A picamera2 package whose import fails like apt's does under a pip-installed numpy 2.

    A fake (this machine has no camera and no apt picamera2): it only reproduces the import error.
    """
    pkg = tmp_path / "fakemods" / "picamera2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text(f"# FAKE picamera2: fails at import like a numpy ABI clash\n"
                                     f"raise ValueError({NUMPY_ABI_ERROR!r})\n")
    monkeypatch.syspath_prepend(str(pkg.parent))
    monkeypatch.delitem(sys.modules, "picamera2", raising=False)
    return pkg.parent


def test_picamera2_value_error_at_import_is_one_line_with_the_fix(broken_picamera2):
    from edge_agent.sources import open_source

    with pytest.raises(SourceError) as err:
        open_source({"kind": "picamera2"})
    text = str(err.value)
    assert "\n" not in text
    assert NUMPY_ABI_ERROR in text and 'pip install \\"numpy<2\\"' not in text
    assert 'pip install "numpy<2"' in text and "python3-picamera2" in text


def test_the_daemon_reports_a_broken_picamera2_and_keeps_running(broken_picamera2, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(broken_picamera2), str(REPO)]),
           "EDGE_AGENT_SOURCE_KIND": "picamera2", "EDGE_AGENT_MQTT_ENABLED": "false",
           "EDGE_AGENT_MODEL_PATH": str(DM05), "EDGE_AGENT_AGENT_STATE_DIR": str(tmp_path / "state")}
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run"], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    reader.start()
    deadline = time.monotonic() + 60
    while not any("numpy.dtype size changed" in line for line in lines):
        assert time.monotonic() < deadline and proc.poll() is None, "".join(lines)
        time.sleep(0.05)
    assert proc.poll() is None  # still serving (MQTT, commands) without a camera
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    reader.join(5)
    out = "".join(lines)
    assert "Traceback" not in out
    assert any('pip install "numpy<2"' in line for line in lines), out


# -- every EDGE_AGENT_* variable the README names, set the way a user sets it ------------------------

def _readme_variables():
    names = set(re.findall(r"\bEDGE_AGENT_[A-Z][A-Z0-9_]*[A-Z0-9]\b", (REPO / "README.md").read_text()))
    return sorted(names)


# What `config check` needs besides the key under test: a source and a model `run` can start with.
RUNNABLE = {"EDGE_AGENT_SOURCE_KIND": "synthetic", "EDGE_AGENT_MODEL_PATH": str(DM05)}


def check_config(tmp_path):
    config = tmp_path / "agent.toml"
    config.write_text('[agent]\ndevice_id = "from-env-config"\n')
    proc = cli("config", "check", env={"EDGE_AGENT_CONFIG": str(config), **RUNNABLE})
    assert proc.returncode == 0, proc.stderr
    assert f"config OK ({config}): device from-env-config" in proc.stdout


def check_runtime(tmp_path):
    ok = cli("segment", str(BIRD), "-m", str(DM05), "--out", str(tmp_path / "o"),
             env={"EDGE_AGENT_RUNTIME": "litert"})
    assert ok.returncode == 0 and "| litert " in ok.stdout, ok.stderr
    bad = cli("segment", str(BIRD), "-m", str(DM05), "--out", str(tmp_path / "o"),
              env={"EDGE_AGENT_RUNTIME": "no-such-runtime"})
    assert "no-such-runtime" in refused_in_one_line(bad)


def check_models_dir(tmp_path):
    models = tmp_path / "models"
    fetched = cli("models", "fetch", DM05_NAME, "--mirror", str(MODELS),
                  env={"EDGE_AGENT_MODELS_DIR": str(models)})
    assert fetched.returncode == 0, fetched.stderr
    assert (models / DM05.name).is_file()
    listed = cli("models", "list", env={"EDGE_AGENT_MODELS_DIR": str(models)})
    assert re.search(rf"^\* {DM05_NAME}\b", listed.stdout, re.M), listed.stdout


def check_model_mirror(tmp_path):
    models = tmp_path / "mirrored"
    env = {"EDGE_AGENT_MODEL_MIRROR": str(MODELS), "EDGE_AGENT_MODELS_DIR": str(models)}
    fetched = cli("models", "fetch", DM05_NAME, env=env)  # no --mirror: the variable says where
    assert fetched.returncode == 0, fetched.stderr
    assert (models / DM05.name).is_file()
    # the same variable is the daemon's model.mirror, not an unknown key
    shown = cli("config", "show", "--format", "json", env=env)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["model"]["mirror"] == str(MODELS)


def check_mqtt_host(tmp_path):
    shown = cli("config", "show", "--format", "json", env={"EDGE_AGENT_MQTT_HOST": "broker.lan"})
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["mqtt"]["host"] == "broker.lan"
    typo = cli("config", "check", env={"EDGE_AGENT_MQTT_HOTS": "broker.lan", **RUNNABLE})
    assert "EDGE_AGENT_MQTT_HOTS: unknown key mqtt.hots" in refused_in_one_line(typo)


def check_manifest(tmp_path):
    doc = json.loads((REPO / "edge_agent" / "data" / "manifest.json").read_text())
    doc["models"] = [dict(m, name="site-model") for m in doc["models"] if m["file"] == DM05.name]
    doc["default"] = "site-model"
    manifest = tmp_path / "site-manifest.json"
    manifest.write_text(json.dumps(doc))
    listed = cli("models", "list", env={"EDGE_AGENT_MANIFEST": str(manifest)})
    assert listed.returncode == 0, listed.stderr
    assert "site-model" in listed.stdout and "deeplabv3_mnv2_pascal_quant " not in listed.stdout


def check_console_token(tmp_path):
    off_loopback = ("console", "--listen", "0.0.0.0:0", "--port", "1")
    short = cli(*off_loopback, env={"EDGE_AGENT_CONSOLE_TOKEN": "short"})
    assert "EDGE_AGENT_CONSOLE_TOKEN: the token must have at least 16 characters" in refused_in_one_line(short)
    # a real token passes the listen rule; the refusal is then the (absent) broker's
    taken = cli(*off_loopback, env={"EDGE_AGENT_CONSOLE_TOKEN": "a-console-token-of-some-length"})
    assert "cannot connect to localhost:1" in refused_in_one_line(taken)


def check_prefix_only(tmp_path):  # "EDGE_AGENT_" alone, in the README's sentence on overrides
    shown = cli("config", "show", "--format", "json", env={"EDGE_AGENT_SOURCE_FPS": "7.5"})
    assert json.loads(shown.stdout)["source"]["fps"] == 7.5


VARIABLE_CHECKS = {
    "EDGE_AGENT_CONFIG": check_config,
    "EDGE_AGENT_RUNTIME": check_runtime,
    "EDGE_AGENT_MODELS_DIR": check_models_dir,
    "EDGE_AGENT_MODEL_MIRROR": check_model_mirror,
    "EDGE_AGENT_MQTT_HOST": check_mqtt_host,
    "EDGE_AGENT_MANIFEST": check_manifest,
    "EDGE_AGENT_CONSOLE_TOKEN": check_console_token,
}


def check_mqtt_port(tmp_path):
    shown = cli("config", "show", "--format", "json", env={"EDGE_AGENT_MQTT_PORT": "18830"})
    assert json.loads(shown.stdout)["mqtt"]["port"] == 18830
    assert "mqtt.port: expected integer" in refused_in_one_line(cli("config", "check", env={"EDGE_AGENT_MQTT_PORT": "x", **RUNNABLE}))


def check_source_uri(tmp_path):
    shown = cli("config", "show", "--format", "json", env={"EDGE_AGENT_SOURCE_URI": str(tmp_path)})
    assert json.loads(shown.stdout)["source"]["uri"] == str(tmp_path)


VARIABLE_CHECKS.update({
    "EDGE_AGENT_MQTT_PORT": check_mqtt_port,
    "EDGE_AGENT_SOURCE_URI": check_source_uri,
})

# Variables of the test tooling, not of the product: each must be read by the file named here (a
# README that names a variable nothing reads fails).
TOOLING_VARIABLES = {
    "EDGE_AGENT_SKIP_ARM64": ".ci/run",
    "EDGE_AGENT_TEST_PYTHON313": "tests/test_installed.py",  # EDGE_AGENT_TEST_PYTHON<MAJ><MIN>
}


def test_every_variable_the_readme_names_has_a_check():
    named = set(_readme_variables())
    assert named <= set(VARIABLE_CHECKS) | set(TOOLING_VARIABLES), named - set(VARIABLE_CHECKS) - set(TOOLING_VARIABLES)


def test_tooling_variables_are_read_where_the_readme_says():
    for name, path in TOOLING_VARIABLES.items():
        text = (REPO / path).read_text()
        stem = "EDGE_AGENT_TEST_PYTHON" if name.startswith("EDGE_AGENT_TEST_PYTHON") else name
        assert stem in text, (name, path)


@pytest.mark.parametrize("name", sorted(VARIABLE_CHECKS))
def test_readme_variable(name, tmp_path):
    VARIABLE_CHECKS[name](tmp_path)


def test_section_key_overrides(tmp_path):
    check_prefix_only(tmp_path)


# -- manifest names wherever a model is taken -------------------------------------------------------

@pytest.fixture
def fetched_models(tmp_path):
    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(DM05, models / DM05.name)
    return {"EDGE_AGENT_MODELS_DIR": str(models)}


def test_inspect_takes_a_manifest_name(fetched_models):
    proc = cli("inspect", DM05_NAME, "--json", env=fetched_models)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["inputs"][0]["shape"] == [1, 513, 513, 3]


def test_cpu_fallback_takes_a_manifest_name(fetched_models, tmp_path):
    proc = cli("segment", str(BIRD), "-m", str(DM05_EDGETPU), "--edgetpu", "--cpu-fallback", DM05_NAME,
               "--out", str(tmp_path / "o"), env=fetched_models)
    assert proc.returncode == 0, proc.stderr
    assert "bird" in proc.stdout


def test_demo_names_its_missing_images_in_one_line(tmp_path):
    line = refused_in_one_line(cli("demo", "--images", str(tmp_path / "nowhere")))
    assert line == f"edge-agent: error: {tmp_path / 'nowhere'}: no such image folder (pass --images DIR)"
