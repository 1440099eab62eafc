"""The model manager is the one owner of the running model: start-up choice and fallback, the one
model-by-name rule, swap with confirmation, and undo (public API, real models, a real pipeline)."""

from __future__ import annotations

import hashlib
import time

import pytest

from edge_agent.config import load_config
from edge_agent.daemon.agent import Agent
from edge_agent.daemon.model_manager import ActivationFailed, Untrusted
from edge_agent.errors import EdgeAgentError, ModelError
from edge_agent.models import signing
from tests.data import DM05, DM05_EDGETPU, DM10, LABELS

SHA = {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in (DM05, DM10, DM05_EDGETPU)}


def make_agent(tmp_path, *extra):
    cfg = load_config(None, [f"model.path={DM05}", f"model.labels={LABELS}", "mqtt.enabled=false",
                             "source.kind=synthetic", "source.fps=30", f"agent.state_dir={tmp_path}", *extra],
                      env={})
    agent = Agent(cfg, install_signals=False, handlers={})
    assert agent.models.open_store() is not None
    return agent


@pytest.fixture
def running(tmp_path):
    agent = make_agent(tmp_path)
    agent.start_pipeline()
    assert agent.pipeline is not None, agent.error
    yield agent
    agent.stop_pipeline()


def stored_dm10(models):
    """DM10 placed in the store (as a deployment does before activating), loaded by name."""
    models.store.adopt(str(DM10), {"name": "dm10", "labels": None})
    return models.build(*models.find("dm10"))


def test_swap_confirms_on_real_frames_and_moves_the_pointers(running):
    models = running.models
    assert models.running_sha() == SHA[DM05]
    new = stored_dm10(models)
    models.activate(new, "deploy", confirm_frames=3, confirm_timeout_s=60)
    assert models.running is new and running.pipeline.segmenter is new and running.segmenter is new
    store = models.store
    assert (store.current(), store.previous(), store.pending()) == (SHA[DM10], SHA[DM05], None)
    info = running.info()
    assert info["model"]["sha256"] == SHA[DM10] and info["model"]["name"] == "dm10"
    assert models.pointers() == {"current": SHA[DM10], "previous": SHA[DM05], "pending": None}


def test_a_model_that_does_not_confirm_is_swapped_back(running):
    models = running.models
    old = models.running
    new = stored_dm10(models)
    with pytest.raises(ActivationFailed, match="rolled back after the swap: only .* of 100000 frames"):
        models.activate(new, "deploy", confirm_frames=100_000, confirm_timeout_s=0.5)
    assert models.running is old and running.pipeline.segmenter is old
    # the first deployment adopted the configured model; the pointers are back on it
    assert models.store.current() == SHA[DM05] and models.store.pending() is None
    counted = running.pipeline.counters.inferred
    deadline = time.monotonic() + 30
    while running.pipeline.counters.inferred < counted + 2:  # still serving on the old model
        assert time.monotonic() < deadline
        time.sleep(0.02)


def test_start_up_falls_back_to_the_configured_model(tmp_path):
    agent = make_agent(tmp_path)
    store = agent.models.store
    stored = store.adopt(str(DM05_EDGETPU), {"name": "tpu-only", "labels": None})
    store.set_pointers(stored.sha256, None)
    assert agent.models.startup_model()[0] == str(stored.path)  # the store's model comes first
    segmenter = agent.models.load()  # an Edge TPU build without a delegate cannot run here
    assert segmenter.model.path == str(DM05) and agent.models.running is segmenter


def test_one_resolver_names_sha_prefixes_and_never_paths(tmp_path):
    agent = make_agent(tmp_path)
    store = agent.models.store
    store.adopt(str(DM10), {"name": "Big-One", "labels": ["a", "b"]})
    for key in ("big-one", SHA[DM10], SHA[DM10][:8].upper()):
        assert agent.models.find(key) == (str(store.model_path(SHA[DM10])), ["a", "b"])
    with pytest.raises(ModelError, match="unknown model"):
        agent.models.find(SHA[DM10][:7])  # a prefix shorter than 8 is no match
    with pytest.raises(ModelError, match="unknown model"):
        agent.models.find(str(DM05))  # paths are never resolved for a network request


def test_no_model_configured_is_one_line(tmp_path):
    cfg = load_config(None, ["mqtt.enabled=false", f"agent.state_dir={tmp_path}"], env={})
    agent = Agent(cfg, install_signals=False, handlers={})
    with pytest.raises(EdgeAgentError, match="set model.path or model.name"):
        agent.models.load()


@pytest.mark.skipif(not signing.available(), reason="cryptography not installed")
def test_with_a_key_only_verified_or_configured_models_may_become_current(tmp_path):
    """trust_problem: the signature kept in the store entry, or the configured model; activate refuses."""
    from cryptography.hazmat.primitives.asymmetric import ed25519

    key, other = ed25519.Ed25519PrivateKey.generate(), ed25519.Ed25519PrivateKey.generate()
    agent = make_agent(tmp_path, f"deploy.public_key={signing.public_key_base64(key)}")
    models, store = agent.models, agent.models.store
    configured = store.adopt(str(DM05), {"name": "dm05"})  # unsigned, but the config names it
    unsigned = store.adopt(str(DM10), {"name": "dm10"})
    assert models.trust_problem(configured) is None
    assert "has no signature" in models.trust_problem(unsigned)
    signed = signing.deployment_document(SHA[DM10], "dm10")  # what the entry says: sha256 and name
    store.update_manifest(SHA[DM10], signature=signing.sign_deployment(other, signed))
    assert "does not verify" in models.trust_problem(store.get(SHA[DM10]))
    with pytest.raises(Untrusted, match="does not verify"):
        models.activate(models.build(*models.find("dm10")), "rollback", 1, 10)
    assert store.current() is None and store.pending() is None  # nothing moved
    store.update_manifest(SHA[DM10], signature=signing.sign_deployment(key, signed))
    assert models.trust_problem(store.get(SHA[DM10])) is None
    # the start-up choice follows the same rule
    store.set_pointers(SHA[DM10], None)
    assert models.startup_model()[0] == str(store.model_path(SHA[DM10]))
    store.update_manifest(SHA[DM10], signature=None)
    assert models.startup_model()[0] == str(DM05)
    # a key that does not load: no stored model may become current
    bad = make_agent(tmp_path / "bad", "deploy.public_key=bm90IGEga2V5")
    assert "deploy.public_key is unusable" in bad.models.trust_problem(store.get(SHA[DM10]))
