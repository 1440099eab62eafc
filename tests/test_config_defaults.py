"""The config schema (edge_agent/config.py) is the only home of defaults.

The settings objects the layers receive (SourceSettings, the reopen wrapper, OutputSettings,
PipelineSettings, ModelOptions, ModelSettings) take the schema's default for every key they share
with it, never a literal of their own: ``stall_timeout_s`` once drifted to 10 s in two of them
while the config said 5 s.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
from pathlib import Path

import pytest

from edge_agent import config as C
from edge_agent.daemon.pipeline import PipelineSettings
from edge_agent.output.stages import OutputSettings
from edge_agent.inference.model import ModelOptions
from edge_agent.inference.segmenter import ModelSettings
from edge_agent.sources.base import SourceSettings
from edge_agent.sources.reopen import ReopeningSource

# settings class -> (its config section, {its field: the config key it mirrors})
MIRRORS = {
    SourceSettings: (C.SourceConfig, {}),
    OutputSettings: (C.PublishConfig, {}),
    PipelineSettings: (C.PublishConfig, {}),
    ModelOptions: (C.ModelConfig, {}),
    ModelSettings: (C.ModelConfig, {"mode": "preprocess"}),
}


@pytest.mark.parametrize("cls", list(MIRRORS), ids=lambda c: c.__name__)
def test_shared_keys_default_to_the_schema(cls):
    section, renamed = MIRRORS[cls]
    schema = {f.name: f.default for f in dataclasses.fields(section)}
    shared = 0
    for f in dataclasses.fields(cls):
        key = renamed.get(f.name, f.name)
        if key in schema and f.default is not dataclasses.MISSING:
            shared += 1
            if f.default is None and not schema[key]:
                continue  # None = "not set", the schema's 0 / "" (ModelSettings.threads, edgetpu, ...)
            assert f.default == schema[key], f"{cls.__name__}.{f.name} = {f.default!r}, schema says {schema[key]!r}"
    assert shared, f"{cls.__name__} shares no key with {section.__name__}"


@pytest.mark.parametrize("cls", list(MIRRORS), ids=lambda c: c.__name__)
def test_no_literal_default_for_a_schema_key(cls):
    """In the source: a shared key's default names the schema (``SourceConfig.fps``), no literal."""
    section, renamed = MIRRORS[cls]
    keys = {f.name for f in dataclasses.fields(section)}
    tree = ast.parse(inspect.getsource(cls))
    literal = []
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.value is not None:
            name = node.target.id
            if (renamed.get(name, name) in keys and isinstance(node.value, ast.Constant)
                    and node.value.value is not None):  # None = "not set", not a default
                literal.append(f"{name} = {node.value.value!r}")
    assert not literal, f"{cls.__name__} re-declares schema defaults: {literal}"


def test_reopen_wrapper_defaults_are_the_schemas():
    sig = inspect.signature(ReopeningSource.__init__)
    assert sig.parameters["stall_timeout_s"].default == C.SourceConfig.stall_timeout_s
    assert sig.parameters["backoff_max_s"].default == C.SourceConfig.reopen_backoff_max_s
    assert SourceSettings().stall_timeout_s == C.load_config(None, env={}).source.stall_timeout_s == 5.0


def test_settings_built_from_the_default_config_equal_the_bare_defaults():
    cfg = C.load_config(None, env={})
    assert OutputSettings.from_config(cfg) == OutputSettings()
    assert PipelineSettings.from_config(cfg) == PipelineSettings()
    assert ModelOptions.from_config(cfg.model) == ModelOptions()
    bare = ModelSettings()
    built = ModelSettings.from_config(cfg.model)
    assert (built.runtime, built.mode, built.threads) == (bare.runtime, bare.mode, bare.threads)
    assert Path(C.__file__).name == "config.py"
