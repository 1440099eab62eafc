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

import argparse
import csv
import json
import sys
import time
from typing import Any, Dict, List, Optional, TextIO

from edge_agent.daemon.benchmark import parse_frame_size
from edge_agent.errors import EdgeAgentError
from edge_agent.fleet import remote_commands
from edge_agent.fleet.client import DISCOVERY_S, Answer, FleetClient, add_broker_arguments, mqtt_from_args, new_request_id

COMMAND = "benchmark"
__all__ = ["add_parser", "add_broker_arguments", "mqtt_from_args"]  # the broker helpers live in .client
CSV_FIELDS = ("device", "status", "model", "runtime", "delegate", "threads", "runs",
              "p50_ms", "p90_ms", "p99_ms", "mean_ms", "fps", "reason")
TABLE_COLUMNS = (("device", "device"), ("status", "status"), ("model", "model"), ("runtime", "runtime"),
                 ("delegate", "delegate"), ("threads", "threads"), ("runs", "runs"),
                 ("p50_ms", "p50 ms"), ("p90_ms", "p90 ms"), ("p99_ms", "p99 ms"), ("fps", "fps"))


# --------------------------------------------------------------------------- report data


def command_params(args: argparse.Namespace) -> Dict[str, Any]:
    """The ``cmd/benchmark`` fields from the command line (only those given: the device has defaults)."""
    params: Dict[str, Any] = {"runs": args.runs, "warmup": args.warmup, "pipeline": args.pipeline,
                              "pause": args.pause, "input": args.input}
    for key in ("threads", "model", "min_secs", "max_secs"):
        value = getattr(args, key)
        if value is not None:
            params[key] = value
    if args.frame_size is not None:
        params["frame_size"] = "%dx%d" % args.frame_size
    return params


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
    """One row per device with raw numbers (ms, fps); the table and the CSV are made from these."""
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


def _cell(value: Any, digits: int) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def format_table(rows: List[Dict[str, Any]]) -> str:
    """Aligned columns, times with 2 decimals; failures get their reason on the row."""
    header = [title for _, title in TABLE_COLUMNS]
    body = [[_cell(r[key], 2) for key, _ in TABLE_COLUMNS] for r in rows]
    widths = [max(len(h), *(len(b[i]) for b in body)) if body else len(h) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths)).rstrip()]
    for r, cells in zip(rows, body):
        line = "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()
        if r["status"] != "done" and r["reason"]:
            line += f"  ({r['reason']})"
        lines.append(line)
    return "\n".join(lines)


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


# --------------------------------------------------------------------------- CLI


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = remote_commands(subparsers).add_parser(
        "bench", help="benchmark devices over MQTT (one, several, or --all)",
        description="Send cmd/benchmark to devices through the broker and collect their results.")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", "-d", action="append", metavar="ID", help="a device id (repeatable)")
    who.add_argument("--all", action="store_true", help="every device online (fleet topic)")
    p.add_argument("--runs", type=int, default=50, help="measured runs per device (default 50)")
    p.add_argument("--warmup", type=int, default=1, help="warmup runs (default 1)")
    p.add_argument("--min-secs", type=float, default=None, help="run at least this long")
    p.add_argument("--max-secs", type=float, default=None, help="stop after this long (device caps apply)")
    p.add_argument("--threads", type=int, default=None, help="interpreter threads (default: as configured)")
    p.add_argument("--model", default=None, help="a model name/sha256 from the device's store or manifest "
                                                 "(default: the running model)")
    p.add_argument("--pipeline", action="store_true", help="time every stage and end to end")
    p.add_argument("--frame-size", type=_frame_size_arg, default=None, metavar="WxH")
    p.add_argument("--input", choices=("random", "pattern"), default="random")
    p.add_argument("--pause", action="store_true", help="pause the live pipeline while benchmarking")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all answers (default 300)")
    p.add_argument("--discover-s", type=float, default=DISCOVERY_S,
                   help="seconds to collect retained device states before sending (default 1)")
    p.add_argument("--csv", metavar="FILE", help="write one row per device as CSV")
    p.add_argument("--json", metavar="FILE", help="write every answer (full results) as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="PNG of the latency distribution per device (matplotlib)")
    p.add_argument("--progress", choices=("auto", "bar", "text", "none"), default="auto",
                   help="progress display on stderr (default: bar with tqdm on a terminal, else text)")
    add_broker_arguments(p)
    p.set_defaults(func=cmd_remote_bench)
    return p


def _frame_size_arg(text: str) -> Any:
    try:
        return parse_frame_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_remote_bench(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    if args.plot:
        check_matplotlib()
    mqtt = mqtt_from_args(args)
    params = command_params(args)
    with FleetClient(mqtt) as client:
        devices = client.discover(args.discover_s)
        if args.all and not any(d.online for d in devices.values()):
            print(f"no device online under {mqtt.topic_prefix}/ (retained availability); "
                  f"waiting for unannounced devices anyway", file=sys.stderr)
        progress = Progress("none" if args.progress == "none" else args.progress, args.runs, args.warmup)
        rid = new_request_id()
        try:
            answers = client.request(COMMAND, params, devices=None if args.all else args.device,
                                     fleet=args.all, timeout=args.timeout, request_id=rid, on_message=progress)
        finally:
            progress.close()
    report = report_doc(rid, params, answers)
    rows = summary_rows(report)
    print(format_table(rows) if rows else "no device answered", file=out)
    if args.csv:
        _write(args.csv, lambda fh: write_csv(rows, fh))
    if args.json:
        _write(args.json, lambda fh: fh.write(json.dumps(report, indent=2) + "\n"))
    if args.plot:
        plot_latencies(report, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0 if rows and all(r["status"] == "done" for r in rows) else 1


def _write(path: str, write: Any) -> None:
    try:
        with open(path, "w", encoding="utf-8", newline="") as fh:
            write(fh)
    except OSError as exc:
        raise EdgeAgentError(f"{path}: cannot write ({exc.strerror})") from None
