"""docs/asyncapi.yaml describes cmd/deploy, cmd/rollback and cmd/models exactly as the code speaks them.

The request documents are compared with the schemas the agent validates against (fields, required,
types, limits, defaults, patterns); the answers with what edge_agent/deploy.py can publish (its
statuses, stages, states and answer fields are read from its source, so a new one fails here
until it is documented).
"""

from __future__ import annotations

import ast
import re
from pathlib import Path
from typing import Any, Dict, Iterator, List, Set

import pytest

from edge_agent.comms import commands
from edge_agent.remote import deploy as dep
from edge_agent.remote import sanity, transfer
from edge_agent.remote import deploy_request as dreq
from edge_agent.comms.commands import BoolField, FieldSpec, FloatField, IntField, StrField
from edge_agent.fleet import deploy as host
from edge_agent.models.store import ModelStore
from tests.data import DM05

yaml = pytest.importorskip("yaml")

REPO = Path(__file__).resolve().parents[1]
ANSWER_METHODS = ("accept", "progress", "done", "fail", "reject")
SCHEMAS = {"deployRequest": dreq.DEPLOY_SCHEMA, "rollbackRequest": dreq.ROLLBACK_SCHEMA,
           "modelsRequest": dreq.MODELS_SCHEMA}
# strings a pattern of a StrField is probed with: the documented pattern must agree on each
PROBES = ["", "a", "A" * 64, "A" * 128, "A" * 129, "a/b", "a\\b", "a\x01b", "a\nb", "x y", "ümlaut",
          "0" * 64, "F" * 64, "g" * 64, "0" * 63, "abcd", "ab==", "a===", "a+/=", "http://h/m.tflite",
          "HTTPS://h/m", "Https://x", "ftp://h/m", "http://", "http://a b", "https://" + "x" * 2000,
          "https://" + "x" * 2001, "5f1c0e6a", "deeplab-v3", "_invalid"]


@pytest.fixture(scope="module")
def doc() -> Dict[str, Any]:
    return yaml.safe_load((REPO / "docs" / "asyncapi.yaml").read_text(encoding="utf-8"))


def payload(doc: Dict[str, Any], message: str) -> Dict[str, Any]:
    return doc["components"]["messages"][message]["payload"]


def types_of(prop: Dict[str, Any]) -> List[str]:
    t = prop["type"]
    return list(t) if isinstance(t, list) else [t]


# ------------------------------------------------------------------------------ requests


@pytest.mark.parametrize("message", sorted(SCHEMAS))
def test_asyncapi_request_fields_equal_the_schema(doc, message):
    schema = SCHEMAS[message]
    body = payload(doc, message)
    props = body["properties"]
    assert set(props) == {"request_id", *schema}
    assert set(body["required"]) == {"request_id", *(n for n, s in schema.items() if s.required)}
    assert body["additionalProperties"] is False  # validate() refuses unknown fields
    assert props["request_id"]["pattern"] == f"^{commands.REQUEST_ID_PATTERN}$"
    for name, spec in schema.items():
        check_field(name, spec, props[name])


def check_field(name: str, spec: FieldSpec, prop: Dict[str, Any]) -> None:
    types = types_of(prop)
    assert ("null" in types) == spec.nullable, name  # JSON null is refused unless nullable
    if spec.default is not None:
        assert prop.get("default") == spec.default, name
    elif "default" in prop:
        assert prop["default"] is None, name
    if isinstance(spec, (IntField, FloatField)):
        assert types == ["integer" if isinstance(spec, IntField) else "number"], name
        assert (prop["minimum"], prop["maximum"]) == (spec.lo, spec.hi), name
    elif isinstance(spec, StrField):
        assert types == ["string"], name
        documented = re.compile(prop["pattern"])
        for probe in PROBES:
            assert bool(documented.fullmatch(probe)) == bool(spec.regex.fullmatch(probe)), (name, probe)
    elif isinstance(spec, BoolField):
        assert types == ["boolean"], name
    elif isinstance(spec, dreq.LabelsField):
        assert "array" in types and prop["items"]["type"] == "string"
        assert (prop["minItems"], prop["maxItems"]) == (1, dreq.MAX_LABELS)
        assert spec.check(["a" * prop["items"]["maxLength"]]) and not _accepts(
            spec, ["a" * (prop["items"]["maxLength"] + 1)])
    else:
        pytest.fail(f"{name}: a field type this test does not know: {type(spec).__name__}")


def _accepts(spec: FieldSpec, value: Any) -> bool:
    try:
        spec.check(value)
    except ValueError:
        return False
    return True


def test_asyncapi_request_id_parameter_and_size_limits_match_commands(doc):
    param = doc["components"]["parameters"]["requestId"]["description"]
    assert commands.REQUEST_ID_PATTERN in param and "`request_id`" in param
    assert commands.INVALID_ID_TOPIC in param
    assert "[A-Za-z0-9_-]+" not in param  # the old, wrong id rule
    channels = doc["channels"]
    assert f"{dreq.MAX_REQUEST_BYTES} bytes" in channels["cmdDeploy"]["description"]
    for name in ("cmdRollback", "cmdModels"):
        assert f"{commands.DEFAULT_MAX_BYTES} bytes" in channels[name]["description"], name
    for reply, kind in (("deployReply", dep.KIND), ("modelsReply", dep.MODELS_KIND)):
        assert channels[reply]["address"] == f"{{prefix}}/{{deviceId}}/{kind}/{{requestId}}"
        assert f"{kind}/{commands.INVALID_ID_TOPIC}" in channels[reply]["description"], reply


def test_asyncapi_chunk_topic_is_the_one_host_and_agent_use(doc):
    chunk = doc["channels"]["deployChunk"]
    assert chunk["address"] == f"{{prefix}}/{{target}}/cmd/{host.COMMAND}/{{requestId}}/chunk/{{chunk}}"
    assert set(chunk["parameters"]) == {"prefix", "target", "requestId", "chunk"}
    message = doc["components"]["messages"]["deployChunk"]
    assert message["contentType"] == "application/octet-stream"
    # the host's publisher builds exactly this topic; the agent routes it to the chunk assembler
    for target in ("pi-1", "all"):
        assert host.chunk_topic("edge-agent", target, "r-1", 7) == chunk["address"].format(
            prefix="edge-agent", target=target, requestId="r-1", chunk=7)
    operation = doc["operations"]["receiveDeployChunk"]
    assert operation["channel"]["$ref"] == "#/channels/deployChunk"


# ------------------------------------------------------------------------------ answers


def _deploy_tree() -> ast.Module:
    """The deployer and the parts whose reports go into its answers (the sanity check's)."""
    body: List[ast.stmt] = []
    for module in (dep, sanity, transfer):
        body += ast.parse(Path(module.__file__).read_text(encoding="utf-8")).body
    return ast.Module(body=body, type_ignores=[])


def _answer_calls(tree: ast.AST) -> Iterator[ast.Call]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ANSWER_METHODS:
            yield node


def _strings(node: ast.AST) -> Set[str]:
    return {n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)}


def _keyword_values(tree: ast.AST, keyword: str) -> Set[str]:
    """String constants the answers of deploy.py can carry in ``keyword`` (IfExp branches included)."""
    return {s for call in _answer_calls(tree) for kw in call.keywords if kw.arg == keyword
            for s in _strings(kw.value)}


def _answer_field_names(tree: ast.AST) -> Set[str]:
    """Every field name deploy.py puts into a deploy answer: answer keywords, job.fields, reports."""
    names = {kw.arg for call in _answer_calls(tree) for kw in call.keywords if kw.arg}
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "fields" and isinstance(node.value, ast.Dict):
            names |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
        elif isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Store) and (
                (isinstance(node.value, ast.Attribute) and node.value.attr == "fields")
                or (isinstance(node.value, ast.Name) and node.value.id == "report")):
            names |= _strings(node.slice)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) \
                and node.target.id == "report" and isinstance(node.value, ast.Dict):
            names |= {k.value for k in node.value.keys if isinstance(k, ast.Constant)}
        elif isinstance(node, ast.FunctionDef) and node.name == "_activate":
            for ret in (n for n in ast.walk(node) if isinstance(n, ast.Return)):
                if isinstance(ret.value, ast.Dict):
                    names |= {k.value for k in ret.value.keys if isinstance(k, ast.Constant)}
    return names


def test_asyncapi_documents_every_deploy_status_stage_and_state(doc):
    tree = _deploy_tree()
    props = payload(doc, "deployStatus")["properties"]
    assert set(props["status"]["enum"]) == set(commands.STATUSES)
    assert props["kind"]["const"] == dep.KIND
    stages = _keyword_values(tree, "stage")
    assert stages == {"downloading", "verifying", "checking", "activating"}  # the scan finds them
    assert set(props["stage"]["enum"]) == stages
    activate_finals = {s for node in ast.walk(tree) if isinstance(node, ast.Call)
                       and isinstance(node.func, ast.Attribute) and node.func.attr == "_activate"
                       for s in _strings(node.args[2])}
    returned = {s for node in ast.walk(tree) if isinstance(node, ast.Return) and isinstance(node.value, ast.Dict)
                for k, v in zip(node.value.keys, node.value.values)
                if isinstance(k, ast.Constant) and k.value == "state" for s in _strings(v)}
    states = _keyword_values(tree, "state") | activate_finals | returned
    assert states == {"active", "rolled_back", "staged"}
    assert set(props["state"]["enum"]) == states
    assert set(props["transfer"]["enum"]) == _keyword_values(tree, "transfer") == {"chunks", "url"}


def test_asyncapi_documents_every_deploy_answer_field(doc):
    body = payload(doc, "deployStatus")
    names = _answer_field_names(_deploy_tree())
    assert {"stage", "state", "name", "sha256", "running", "sanity_ms", "agreement", "pruned",
            "duplicate_chunks", "transfer", "received", "total", "note"} <= names  # the scan works
    envelope = set(commands.CommandChannel(lambda: None, "x", {})._doc("r", "done", {}))
    assert set(body["required"]) == envelope
    assert names | envelope | {"reason"} == set(body["properties"])


def test_asyncapi_models_answer_matches_the_store_listing(doc, tmp_path):
    body = payload(doc, "modelsList")
    props = body["properties"]
    assert props["kind"]["const"] == dep.MODELS_KIND
    # on_models answers done at once; the channel itself can only add rejected
    assert set(props["status"]["enum"]) == {"done", "rejected"}
    assert set(props["status"]["enum"]) <= set(commands.FINAL_STATUSES)
    store = ModelStore.open(str(tmp_path), keep=2)
    entry = store.adopt(str(DM05), {"name": "dm05", "labels": ["a", "b"], "input_size": [513, 513],
                                    "source": f"config:{DM05}"})
    store.set_pointers(entry.sha256, None)
    listing = {"running": entry.sha256, **store.describe()}  # what Deployer.on_models sends
    envelope = set(commands.CommandChannel(lambda: None, "x", {})._doc("r", "done", {}))
    assert set(props) == set(listing) | envelope | {"reason", "removed"}  # removed: with remove
    (model,) = listing["models"]
    assert set(props["models"]["items"]["properties"]) == set(model)
    assert model["role"] in props["models"]["items"]["properties"]["role"]["enum"]
