"""The classes each camera watches: one rule (edge_agent/models/classes.py), said by the agent in
``info.cameras[i].watched`` (what the console charts) and followed by Home Assistant's entities."""

from __future__ import annotations

from pathlib import Path

from edge_agent.comms.homeassistant import Camera, entities
from edge_agent.config import load_config
from edge_agent.daemon.agent import Agent
from edge_agent.models.classes import watched_classes
from tests.data import DM05, VOC

IMAGES = VOC / "JPEGImages"


def info_of(tmp_path: Path, toml: str) -> dict:
    path = tmp_path / "agent.toml"
    path.write_text(f"""
[agent]
state_dir = "{tmp_path / 'state'}"
[mqtt]
enabled = false
[model]
path = "{DM05}"
""" + toml)
    agent = Agent(load_config(str(path), env={}), install_signals=False)
    agent.models.load()
    return agent.info()


def test_the_rule():
    labels = ["background", "aeroplane", "bicycle", "cat", "diningtable", "person"]
    assert watched_classes(labels, []) == (["person", "cat", "bicycle"], [])  # preferred order, those it has
    assert watched_classes(labels, ["Dining Table", "unicorn"]) == (["diningtable"], ["unicorn"])
    assert watched_classes(None, ["person"]) == ([], ["person"])  # no labels known: nothing watched
    assert watched_classes(["background", "road", "sky"], [], 1) == (["road"], [])


def test_info_says_what_each_camera_watches(tmp_path):
    # a [source] config: one camera "", the default rule on PASCAL VOC's labels
    info = info_of(tmp_path, f'[source]\nkind = "folder"\nuri = "{IMAGES}"\n')
    assert [(c["id"], c["watched"]) for c in info["cameras"]] == [("", ["person", "car", "cat", "dog"])]
    # [homeassistant] classes for every camera, a camera's own classes first
    info = info_of(tmp_path, f"""
[homeassistant]
classes = ["dining table", "bird"]
[[cameras]]
id = "door"
uri = "{IMAGES}"
classes = ["person", "no such class"]
[[cameras]]
id = "yard"
uri = "{IMAGES}"
""")
    assert {c["id"]: c["watched"] for c in info["cameras"]} == {"door": ["person"], "yard": ["diningtable", "bird"]}
    # Home Assistant's class entities follow the same rule
    labels = info["model"]["labels"]
    shown = {(e.camera, e.label) for e in entities(labels, ("dining table", "bird"),
                                                  [Camera("door", ("person", "no such class")), Camera("yard")])
             if e.kind == "presence"}
    assert shown == {("door", "person"), ("yard", "diningtable"), ("yard", "bird")}
