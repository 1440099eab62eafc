"""The documented `info` payload is the one the agent publishes (keys and enums)."""

from __future__ import annotations

from pathlib import Path

import pytest

from edge_agent.daemon.agent import Agent
from edge_agent.config import load_config
from tests.data import DM05

yaml = pytest.importorskip("yaml")
DOC = Path(__file__).resolve().parents[1] / "docs" / "asyncapi.yaml"


def schema():
    return yaml.safe_load(DOC.read_text())["components"]["schemas"]["info"]


def info_doc(tmp_path, with_model: bool):
    cfg = load_config(None, [f"model.path={DM05}", "mqtt.enabled=false",
                             f"agent.state_dir={tmp_path}"], env={})
    agent = Agent(cfg, install_signals=False)
    assert agent.models.open_store() is not None
    agent.start_handlers()
    if with_model:
        agent.models.load()
    assert "deploy" in agent.handlers
    return agent.info()


def check(value, spec, path):
    types = spec.get("type")
    types = [types] if isinstance(types, str) else types or []
    names = {"string": str, "integer": int, "number": (int, float), "object": dict, "array": list,
             "null": type(None), "boolean": bool}
    if types:
        assert isinstance(value, tuple(t for name in types for t in
                                       (names[name] if isinstance(names[name], tuple) else (names[name],)))), \
            f"{path}: {value!r} is not {types}"
    if "enum" in spec and value is not None:
        assert value in spec["enum"], f"{path}: {value!r} not in {spec['enum']}"
    if isinstance(value, dict) and "properties" in spec:
        documented = set(spec["properties"])
        assert set(value) <= documented, f"{path}: undocumented keys {set(value) - documented}"
        for key, sub in value.items():
            check(sub, spec["properties"][key], f"{path}.{key}")


@pytest.mark.parametrize("with_model", [True, False], ids=["running", "no-model"])
def test_info_matches_the_documented_schema(tmp_path, with_model):
    doc = info_doc(tmp_path, with_model)
    spec = schema()
    assert set(spec["required"]) <= set(doc)
    check(doc, spec, "info")
    if with_model:
        assert {"model", "runtime", "runtime_version", "delegate", "threads", "deploy"} <= set(doc)
        # every documented model field is really published
        assert set(doc["model"]) == set(spec["properties"]["model"]["properties"])
