"""The closed-world check of published payloads against docs/asyncapi.yaml, shared by the tests
of a real agent (test_published_payloads) and of the simulated devices (test_fleet_sim).

Closed-world: every object the doc describes with ``properties`` is checked with
``additionalProperties: false`` (a key the code adds without documenting it fails), besides the
doc's own types, enums, patterns and ``required`` lists (JSON Schema, by ``jsonschema``).
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any, Dict, Set

import cv2
import numpy as np
import pytest

from edge_agent.output.encode import decode_mask_png, png_palette
from tests.broker import Recorder

yaml = pytest.importorskip("yaml")
jsonschema = pytest.importorskip("jsonschema")
DOC = yaml.safe_load((Path(__file__).resolve().parents[1] / "docs" / "asyncapi.yaml").read_text())
PREFIX = "edge-agent"


def closed(node: Any) -> Any:
    """The schema with ``additionalProperties: false`` wherever properties are listed and nothing
    else is said (examples are left alone)."""
    if isinstance(node, dict):
        out = {k: (v if k == "examples" else closed(v)) for k, v in node.items()}
        if "properties" in out and "additionalProperties" not in out and "propertyNames" not in out:
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [closed(v) for v in node]
    return node


COMPONENTS = closed(copy.deepcopy(DOC["components"]))


def validator(message: str) -> Any:
    schema = dict(COMPONENTS["messages"][message]["payload"])
    schema["components"] = COMPONENTS  # '#/components/...' references resolve against this root
    return jsonschema.Draft202012Validator(schema)


VALIDATORS = {name: validator(name) for name in (
    "availability", "info", "result", "timingsFrame", "timingsInterval", "stats",
    "benchmarkResult", "deployStatus", "modelsList")}
REPLIES = {"benchmark": "benchmarkResult", "deploy": "deployStatus", "models": "modelsList"}


def check_message(device: str, topic: str, payload: bytes) -> str:
    """Validate one message of ``device``; the name of the documented message it is."""
    suffix = topic[len(f"{PREFIX}/{device}/"):]
    kind = suffix.split("/", 1)[0]
    if kind == "mask":
        mask = decode_mask_png(payload)  # the documented format: a palette PNG of the class ids
        assert mask.ndim == 2 and mask.dtype == np.uint8 and png_palette(payload) is not None, topic
        return "mask"
    if kind == "overlay":
        assert payload.startswith(b"\xff\xd8"), topic
        image = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
        assert image is not None and image.ndim == 3, topic
        return "overlay"
    if kind == "availability":
        name, doc = "availability", payload.decode()
    elif kind == "timings":
        doc = json.loads(payload)
        name = "timingsFrame" if "seq" in doc else "timingsInterval"
    elif kind in REPLIES and suffix.count("/") == 1:
        name, doc = REPLIES[kind], json.loads(payload)
    elif kind in VALIDATORS and "/" not in suffix:
        name, doc = kind, json.loads(payload)
    else:
        raise AssertionError(f"undocumented topic {topic}")
    errors = sorted(VALIDATORS[name].iter_errors(doc), key=lambda e: list(e.absolute_path))
    assert not errors, f"{topic} ({name}): " + "; ".join(
        f"{'/'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in errors[:5])
    return name


def check_all(rec: Recorder, device: str) -> Set[str]:
    return {check_message(device, m.topic, bytes(m.payload))
            for m in list(rec.messages) if m.topic.startswith(f"{PREFIX}/{device}/")
            and not m.topic.startswith(f"{PREFIX}/{device}/cmd/")}


def final_info_then_offline(rec: Recorder, device: str) -> Dict[str, Any]:
    """The last two messages of ``device``'s state: info with status stopped, then offline."""
    state = [m for m in rec.messages if m.topic in (f"{PREFIX}/{device}/info", f"{PREFIX}/{device}/availability")]
    *_, info, offline = state
    assert offline.topic.endswith("/availability") and offline.payload == b"offline" and offline.retain is False
    doc = json.loads(info.payload)
    assert info.topic.endswith("/info") and doc["status"] == "stopped", doc["status"]
    return doc
