"""``edge-agent remote bench``: benchmark one device, several, or the whole fleet over MQTT.

::

    edge-agent remote bench --all --runs 50 --csv bench.csv --json bench.json --plot bench.png
    edge-agent remote bench --device pi-1 --device pi-2 --pipeline --frame-size 1280x720 --pause

The broker comes from ``--config`` (the agent's TOML: its ``[mqtt]`` section, TLS and password
included) and/or ``--host/--port/--prefix``. Output: a progress display on stderr (tqdm when
installed and stderr is a terminal, else one text line per step), then one table row per device
(device, status, model, runtime, delegate, threads, runs, p50/p90/p99 of invoke in ms, fps) on
stdout. ``--csv``/``--json`` write the same rows / the full answers, ``--plot`` a PNG of the
latency distribution per device (needs matplotlib: ``pip install 'edge-agent[fleet]'``).
Exit code 0 when every device answered ``done``, 1 otherwise.
"""

from __future__ import annotations

import csv
import sys
import time
from typing import Any, Dict, List, Optional, TextIO, Tuple

from edge_agent.errors import EdgeAgentError
from edge_agent.fleet.client import Answer, AnswerCallback, FleetClient, new_request_id

COMMAND = "benchmark"
CSV_FIELDS = ("device", "status", "model", "runtime", "delegate", "threads", "runs",
              "p50_ms", "p90_ms", "p99_ms", "mean_ms", "fps", "reason")
TABLE_COLUMNS = (("device", "device"), ("status", "status"), ("model", "model"), ("runtime", "runtime"),
                 ("delegate", "delegate"), ("threads", "threads"), ("runs", "runs"),
                 ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"), ("p99_ms", "p99 ms"), ("fps", "fps"))


# --------------------------------------------------------------------------- report data


def command_params(runs: int, warmup: int = 1, pipeline: bool = False, pause: bool = False,
                   input: str = "random", frame_size: Optional[Tuple[int, int]] = None,
                   **optional: Any) -> Dict[str, Any]:
    """The ``cmd/benchmark`` fields (``optional``: threads, model, min_secs, max_secs; only those
    given, not None, are sent: the device has defaults)."""
    params: Dict[str, Any] = {"runs": runs, "warmup": warmup, "pipeline": pipeline, "pause": pause,
                              "input": input}
    params.update({k: v for k, v in optional.items() if v is not None})
    if frame_size is not None:
        params["frame_size"] = "%dx%d" % tuple(frame_size)
    return params


def run(client: FleetClient, params: Dict[str, Any], devices: Optional[List[str]] = None, fleet: bool = False,
        timeout: float = 300.0, on_message: Optional[AnswerCallback] = None,
        request_id: Optional[str] = None) -> Dict[str, Any]:
    """Send one ``cmd/benchmark`` and wait for every answer: the :func:`report_doc` (``--json``).
    ``remote bench`` and the console both benchmark through here."""
    rid = request_id or new_request_id()
    answers = client.request(COMMAND, params, devices=None if fleet else devices, fleet=fleet,
                             timeout=timeout, request_id=rid, on_message=on_message)
    return report_doc(rid, params, answers)


def report_doc(request_id: str, params: Dict[str, Any], answers: Dict[str, Answer]) -> Dict[str, Any]:
    """Everything we know, as written by ``--json``: per device status, reason and result."""
    return {
        "request_id": request_id,
        "command": params,
        "finished_at": round(time.time(), 3),
        "devices": {dev: {"status": a.status, "reason": a.reason,
                          "result": (a.final or {}).get("result") if a.ok else None}
                    for dev, a in answers.items()},
    }


def summary_rows(report: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One row per device with raw numbers (ms, fps); the table (``format_table(rows, TABLE_COLUMNS)``)
    and the CSV are made from these."""
    rows = []
    for dev, entry in report["devices"].items():
        result = entry.get("result") or {}
        invoke = result.get("invoke") or {}
        model = result.get("model") or {}
        rows.append({
            "device": dev, "status": entry["status"], "model": model.get("name"),
            "runtime": " ".join(str(x) for x in (result.get("runtime"), result.get("runtime_version")) if x) or None,
            "delegate": (result.get("delegate") or "cpu") if result else None,
            "threads": result.get("threads"), "runs": invoke.get("count"),
            "p50_ms": invoke.get("p50"), "p90_ms": invoke.get("p90"), "p99_ms": invoke.get("p99"),
            "mean_ms": invoke.get("mean"), "fps": result.get("fps"), "reason": entry.get("reason"),
        })
    return rows


def write_csv(rows: List[Dict[str, Any]], out: TextIO) -> None:
    writer = csv.DictWriter(out, fieldnames=CSV_FIELDS)
    writer.writeheader()
    for r in rows:
        writer.writerow({k: "" if r[k] is None else (round(r[k], 4) if isinstance(r[k], float) else r[k])
                         for k in CSV_FIELDS})


# --------------------------------------------------------------------------- plot


def check_matplotlib() -> None:
    """Fail before benchmarking when --plot cannot be honoured."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise EdgeAgentError("--plot needs matplotlib, which is not installed: "
                             "pip install 'edge-agent[fleet]' (or pip install matplotlib)") from None


def plot_latencies(report: Dict[str, Any], path: str) -> int:
    """Box plot + points of the per-run invoke latency for each device; returns devices plotted."""
    check_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(dev, e["result"]["samples_ms"]) for dev, e in report["devices"].items()
              if e.get("result") and e["result"].get("samples_ms")]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.6 * len(series) + 2), 4.5))
    try:
        if series:
            ax.boxplot([s for _, s in series], whis=(1, 99), showfliers=False)
            for i, (_, samples) in enumerate(series, start=1):
                jitter = [i + 0.12 * ((k % 7) - 3) / 3 for k in range(len(samples))]
                ax.plot(jitter, samples, ".", alpha=0.35, markersize=3)
            ax.set_xticks(range(1, len(series) + 1))
            ax.set_xticklabels([dev for dev, _ in series], rotation=20)
        else:
            ax.text(0.5, 0.5, "no results", ha="center", va="center", transform=ax.transAxes)
        ax.set_ylabel("invoke latency (ms); whiskers p1..p99")
        ax.set_title(f"remote bench {report['request_id'][:8]}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=100)
    except OSError as exc:
        raise EdgeAgentError(f"{path}: cannot write the plot ({exc.strerror})") from None
    finally:
        plt.close(fig)
    return len(series)


# --------------------------------------------------------------------------- progress


class Progress:
    """Shows accepted/progress/final answers: a tqdm bar, plain text lines, or nothing."""

    def __init__(self, mode: str, runs: int, warmup: int, out: Optional[TextIO] = None) -> None:
        self.out = out or sys.stderr
        self.per_device = runs + warmup
        self.done: Dict[str, int] = {}
        self.bar = None
        self.mode = mode
        if mode == "auto":
            self.mode = "bar" if getattr(self.out, "isatty", lambda: False)() else "text"
        if self.mode == "bar" and not _tqdm_available():
            self.mode = "text"  # plain lines without tqdm
        if self.mode == "bar":
            from tqdm import tqdm

            self.bar = tqdm(total=0, unit="run", file=out, desc="benchmark")

    def __call__(self, device: str, doc: Dict[str, Any]) -> None:
        status = doc.get("status")
        if status == "accepted":
            self.done[device] = 0
            if self.bar is not None:
                self.bar.total += self.per_device
                self.bar.refresh()
            self._line(device, f"accepted (queue position {doc.get('queue_position', 0)})")
        elif status == "progress":
            phase, done, total = doc.get("phase"), int(doc.get("done") or 0), int(doc.get("total") or 0)
            if phase == "warmup":
                count = done
            elif phase == "runs":
                count = min(done, total) + self.per_device - total  # plus the warmup runs
            else:
                count = 0
            if self.bar is not None:
                self.bar.update(max(0, count - self.done.get(device, 0)))
            self.done[device] = max(count, self.done.get(device, 0))
            self._line(device, f"{phase} {done}/{total}")
        elif status is not None:
            self._line(device, status + (f": {doc['reason']}" if doc.get("reason") else ""))

    def _line(self, device: str, text: str) -> None:
        if self.mode == "text":
            print(f"{device}: {text}", file=self.out, flush=True)
        elif self.bar is not None:
            self.bar.set_postfix_str(f"{device}: {text}"[:40])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _tqdm_available() -> bool:
    try:
        import tqdm  # noqa: F401
        return True
    except ImportError:
        return False
