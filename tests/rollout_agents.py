"""Agents for rollout tests (config in their own folder, groups as tags) and what they run: shared by
tests/test_rollout.py and the console's rollout tests."""

from __future__ import annotations

import contextlib
import hashlib
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, Iterator, List, Tuple

from edge_agent.config import load_config
from edge_agent.fleet.client import FleetClient
from tests.data import DM05, IMAGES
from tests.helpers import stop_agent, wait_until, write_config


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


@contextlib.contextmanager
def two_agents(tmp_path: Path, port: int) -> Iterator[Tuple[FleetClient, Dict[str, Path]]]:
    """``ro-a`` (2 fps, groups site-a and door) and ``ro-b`` (full speed, site-a) running, online with a
    model, and a FleetClient; stopped afterwards, each agent's log tail printed."""
    configs = {"ro-a": _agent(tmp_path, "ro-a", port, 2.0, ["site-a", "door"]),
               "ro-b": _agent(tmp_path, "ro-b", port, 0.0, ["site-a"])}
    logs = {name: open(tmp_path / f"{name}.log", "wb") for name in configs}
    # output to a file: an undrained pipe would block the agent
    procs = [subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(config)],
                              stdout=logs[name], stderr=subprocess.STDOUT) for name, config in configs.items()]
    client = FleetClient(load_config(str(configs["ro-a"]), env={}).mqtt).connect()
    try:
        wait_until(lambda: {d for d, v in client.discover(0.5).items()
                            if v.online and (v.info or {}).get("model")} >= set(configs), 60, "both agents online")
        yield client, configs
    finally:
        client.close()
        for proc in procs:
            stop_agent(proc)
        for name, fh in logs.items():
            fh.close()
            print(f"--- {name}\n{(tmp_path / f'{name}.log').read_text(errors='replace')[-3000:]}")
