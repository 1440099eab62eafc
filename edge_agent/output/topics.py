"""Topic suffixes of what a camera publishes (no heavy imports: the comms and fleet use it too)."""

from __future__ import annotations

CAMERA = "camera"  # camera/<id>/<kind>: a camera's data topics (docs/asyncapi.yaml, Cameras)


def camera_suffix(camera: str, kind: str) -> str:
    """The topic suffix of a camera's ``kind`` (result, mask, overlay, timings): ``kind`` for the
    one camera "" of a ``[source]`` config, else ``camera/<camera>/<kind>`` (docs/asyncapi.yaml)."""
    return f"{CAMERA}/{camera}/{kind}" if camera else kind


def split_camera_suffix(suffix: str) -> tuple:
    """(camera, kind) of a topic suffix: ("", "result") or ("door", "result")."""
    parts = suffix.split("/")
    if parts[0] == CAMERA and len(parts) == 3:
        return parts[1], parts[2]
    return "", suffix
