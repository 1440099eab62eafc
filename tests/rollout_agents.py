"""Agents for rollout tests (config in their own folder, groups as tags) and what they run: shared by
tests/test_rollout.py and the console's rollout tests."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Dict, List

from edge_agent.fleet.client import FleetClient
from tests.data import DM05, IMAGES
from tests.helpers import write_config


SHA05 = hashlib.sha256(DM05.read_bytes()).hexdigest()


def _agent(tmp_path: Path, name: str, port: int, fps: float, tags: List[str]) -> Path:
    """An agent of its own (config, state, images) in tmp_path/name, in groups ``tags``."""
    home = tmp_path / name
    folder = home / "images"
    folder.mkdir(parents=True)
    for image in ("bird.bmp", "cat.bmp"):
        (folder / image).symlink_to(IMAGES / image)
    config = write_config(home / "agent.toml", name, port, {"kind": "folder", "uri": str(folder), "fps": fps},
                          model={"threads": 1},
                          publish={"timings_interval_s": 1.0, "stats_interval_s": 1.0, "mask_every_n": 1000})
    text = config.read_text().replace('log_level = "debug"', 'log_level = "info"')
    config.write_text(text.replace("[agent]\n", f"[agent]\ntags = {json.dumps(tags)}\n", 1))
    return config


def _running(client: FleetClient) -> Dict[str, str]:
    client.discover(0.5)
    return {d: ((v.info or {}).get("model") or {}).get("sha256") for d, v in client.devices().items()}
