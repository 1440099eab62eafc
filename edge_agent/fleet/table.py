"""The fleet commands' one text table: aligned columns, a failed row followed by its reason.

``remote bench``, ``remote deploy|rollback`` and ``remote models`` print their per-device
answers with :func:`format_table`; tests parse its output, so its layout is part of the CLI.
"""

from __future__ import annotations

from typing import Any, Dict, List, Sequence, Tuple, Union

Column = Union[str, Tuple[str, str]]  # a row key (also the title), or (row key, title)


def cell(value: Any, digits: int = 2) -> str:
    """``-`` for a missing value, floats with ``digits`` decimals, anything else as ``str``."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows: List[Dict[str, Any]], columns: Sequence[Column], digits: int = 2) -> str:
    """Header plus one line per row; a row whose ``status`` is not ``done`` gets ``  (reason)``."""
    pairs = [(c, c) if isinstance(c, str) else c for c in columns]
    header = [title for _, title in pairs]
    body = [[cell(r.get(key), digits) for key, _ in pairs] for r in rows]
    widths = [max([len(h)] + [len(b[i]) for b in body]) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    for r, cells in zip(rows, body):
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        if r.get("status") not in ("done", None) and r.get("reason"):
            line += f"  ({r['reason']})"
        lines.append(line)
    return "\n".join(lines)


DEVICE_COLUMNS = ("device", "status", "groups", "model", "runtime", "threads", "agent", "via")


def device_row(device: Any) -> Dict[str, Any]:
    """``remote devices``: one row per :class:`~edge_agent.fleet.client.Device`."""
    info = device.info or {}
    model = info.get("model") or {}
    online = {True: "online", False: "offline", None: "unknown"}[device.online]
    return {"device": device.id, "status": online if info.get("status") in (None, "running") or not device.online
            else f"online ({info['status']})", "groups": ",".join(info.get("tags") or []) or None,
            "model": model.get("name"),
            "runtime": " ".join(str(x) for x in (info.get("runtime"), info.get("runtime_version")) if x) or None,
            "threads": info.get("threads"), "agent": info.get("agent_version"), "via": "+".join(device.via) or None}
