"""``edge-agent homeassistant [--remove]``: the device's Home Assistant entities on the broker.

Lists the discovery configs the broker holds for this device (what Home Assistant shows), or
with ``--remove`` clears them, which removes the device and its entities from Home Assistant.
The agent re-announces them at its next start while ``homeassistant.enabled`` is true.
"""

from __future__ import annotations

import argparse
import json

from edge_agent.comms import homeassistant
from edge_agent.cli.config import add_config_arguments, config_from_args


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("homeassistant", help="list or remove this device's Home Assistant entities")
    add_config_arguments(p)
    p.add_argument("--remove", action="store_true",
                   help="remove the entities (empty retained discovery configs)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    config = config_from_args(args)
    if args.remove:
        print(homeassistant.removal_note(homeassistant.remove_entities(config), config))
        return 0
    configs = homeassistant.retained_configs(config)
    for topic, payload in configs.items():
        try:
            doc = json.loads(payload)
            object_id, name = doc.get("object_id", "?"), doc.get("name", "?")
        except (ValueError, AttributeError):
            object_id = name = "?"
        component = topic.split("/")[-4]
        print(f"{component}.{object_id:40s} {name:28s} {topic}")
    if not configs:
        print(homeassistant.removal_note([], config).replace("(nothing to remove)", "(not announced)"))
    return 0
