"""Files the installed agent needs at run time: the model manifest, the systemd unit template
and the documented example config. Shipped inside the package so a wheel behaves like a checkout."""

from __future__ import annotations

from pathlib import Path

MANIFEST = "manifest.json"
UNIT_TEMPLATE = "edge-agent.service"
CONFIG_EXAMPLE = "config.example.toml"


def path(name: str) -> Path:
    """The packaged file ``name`` (a real file: the package is never installed zipped)."""
    return Path(__file__).resolve().with_name(name)
