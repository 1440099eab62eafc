"""The console's limits, in one place (each has an ``edge-agent console`` flag; README "Console").

They bound what any client of the page or of the broker can make the console hold:

* ``max_upload_mb``: the largest model file ``POST /api/deploy`` accepts (MiB). The upload is
  streamed to a temporary file in ``upload_dir`` (the system's temporary directory by default),
  never held in memory; beyond the cap the answer is 413 and the file is removed. The default is
  the agent's own ``deploy.max_size_mb`` default: a bigger model would be refused by the devices.
  One upload or deployment (or rollback) at a time per device: another one for a device that has
  one running is answered 409.
* ``max_event_streams``: concurrent ``GET /api/events`` streams (each open page holds one); one
  more is answered 503.
* ``read_only``: a viewer's console (``--read-only``, for a viewer's broker credentials: the broker
  would refuse its commands anyway): the page hides benchmark, deploy, rollback and the rollout
  controls, and every state-changing request is answered 403.
* ``state_dir``: where the console keeps what outlives it: the rollouts' state files and their models
  (``<state_dir>/rollouts``); default ``$XDG_STATE_HOME/edge-agent/console`` (``~/.local/state/...``).
  One rollout runs at a time; the page lists the newest 50.
* ``forget_after_s``: a device not online and not heard from for this long is forgotten, its
  masks and overlays freed (it comes back with its next message). It is forgotten at once when
  its retained availability or info is cleared (an empty retained message).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from edge_agent.config import DeployConfig

MAX_UPLOAD_MB = float(DeployConfig().max_size_mb)  # what the agents accept by default: 64 MiB
MAX_EVENT_STREAMS = 64
FORGET_AFTER_S = 24 * 3600.0


@dataclass(frozen=True)
class Settings:
    max_upload_mb: float = MAX_UPLOAD_MB
    max_event_streams: int = MAX_EVENT_STREAMS
    forget_after_s: float = FORGET_AFTER_S
    read_only: bool = False
    upload_dir: Optional[str] = None  # None: tempfile's directory ($TMPDIR, else /tmp)
    state_dir: Optional[str] = None  # None: $XDG_STATE_HOME/edge-agent/console (~/.local/state/...)

    @property
    def rollouts_dir(self) -> Path:
        base = self.state_dir or os.path.join(
            os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state"), "edge-agent", "console")
        return Path(base) / "rollouts"

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def sweep_s(self) -> float:
        """How often the devices are checked for forgetting."""
        return min(60.0, max(0.2, self.forget_after_s / 4))
