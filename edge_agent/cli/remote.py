"""``edge-agent remote bench|deploy|rollback|models``: commands sent to devices through the broker."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, TextIO

from edge_agent.config import load_config
from edge_agent.output.benchmark import parse_frame_size
from edge_agent.errors import EdgeAgentError
from edge_agent.fleet.bench import (TABLE_COLUMNS, Progress, check_matplotlib, command_params,
                                    plot_latencies, summary_rows, write_csv)
from edge_agent.fleet.bench import run as run_bench
from edge_agent.fleet.client import DISCOVERY_S, FleetClient, select_group
from edge_agent.fleet.deploy import (DEFAULT_CHUNK_SIZE, deploy, deploy_params, list_models,
                                     report_deploy_answers, report_model_answers, rollback)
from edge_agent.fleet.table import DEVICE_COLUMNS, device_row, format_table
from edge_agent.inference.labels import read_labels


def add_parser(subparsers: Any) -> None:
    remote = subparsers.add_parser("remote", help="benchmark and manage devices over MQTT",
                                   description="Commands sent to devices through the MQTT broker.")
    sub = remote.add_subparsers(dest="remote_command", metavar="COMMAND", required=True)
    _add_bench(sub)
    _add_deploy(sub)
    _add_rollout(sub)
    _add_devices(sub)


# flag -> [mqtt] key; each flag wins over the config file and EDGE_AGENT_MQTT_* (like --set)
_BROKER_FLAGS = (("host", "host"), ("port", "port"), ("prefix", "topic_prefix"), ("username", "username"),
                 ("password_file", "password_file"), ("ca_file", "ca_file"), ("cert_file", "cert_file"),
                 ("key_file", "key_file"), ("protocol", "protocol"))


def add_broker_arguments(p: argparse.ArgumentParser) -> None:
    """How to reach the broker, shared by the remote commands (and the console): the agent's TOML
    (``--config``, default $EDGE_AGENT_CONFIG), ``EDGE_AGENT_MQTT_*`` variables, then these flags."""
    g = p.add_argument_group("broker (default: --config's [mqtt], EDGE_AGENT_MQTT_* variables)")
    g.add_argument("--config", "-c", metavar="FILE", default=os.environ.get("EDGE_AGENT_CONFIG"),
                   help="agent config TOML whose [mqtt] section to use (default: $EDGE_AGENT_CONFIG)")
    g.add_argument("--set", dest="overrides", action="append", default=[], metavar="mqtt.KEY=VALUE",
                   help="override a config key (e.g. mqtt.keepalive=60); repeatable")
    g.add_argument("--host", help="broker host")
    g.add_argument("--port", type=int, help="broker port")
    g.add_argument("--prefix", help="topic prefix (default edge-agent)")
    g.add_argument("--username", help="MQTT user name")
    g.add_argument("--password-file", metavar="FILE", help="file holding the MQTT password (first line)")
    g.add_argument("--tls", action="store_true", default=None, help="connect with TLS (implied by the TLS files)")
    g.add_argument("--ca-file", metavar="PEM", help="CA certificate(s) that signed the broker's certificate")
    g.add_argument("--cert-file", metavar="PEM", help="client certificate (with --key-file)")
    g.add_argument("--key-file", metavar="PEM", help="client certificate's private key")
    g.add_argument("--tls-insecure", action="store_true", default=None,
                   help="do not check the broker certificate's host name (the chain still is)")
    g.add_argument("--protocol", choices=("auto", "5", "3.1.1"), help="MQTT version (default auto: 5, "
                                                                       "falling back to 3.1.1)")


def mqtt_from_args(args: argparse.Namespace) -> Any:
    """The ``[mqtt]`` settings: defaults < --config < EDGE_AGENT_MQTT_* < --set < the flags."""
    overrides = list(args.overrides)
    for flag, key in _BROKER_FLAGS:
        value = getattr(args, flag, None)
        if value is not None:
            overrides.append(f"mqtt.{key}={value}")
    if getattr(args, "password_file", None):
        overrides.append("mqtt.password=")  # the file given here replaces a password from the config
    if getattr(args, "tls", None) or any(getattr(args, f, None) for f in ("ca_file", "cert_file", "key_file")):
        overrides.append("mqtt.tls=true")
    if getattr(args, "tls_insecure", None):
        overrides.append("mqtt.tls_insecure=true")
    return load_config(args.config, overrides).mqtt


def _discover(client: FleetClient, seconds: float) -> Dict[str, Any]:
    """Retained states + presence query; says on stderr how the devices were found."""
    devices = client.discover(seconds)
    print(f"discovery: {client.discovery}", file=sys.stderr)
    return devices


def _who(args: argparse.Namespace, devices: Dict[str, Any]) -> Optional[List[str]]:
    """The device ids a command goes to: --device, the online members of --group, or None (--all)."""
    if getattr(args, "group", None):
        chosen = select_group(devices, args.group)
        print(f"group {args.group}: {', '.join(chosen)}", file=sys.stderr)
        return chosen
    return args.device


def _add_bench(remote: Any) -> None:
    p = remote.add_parser(
        "bench", help="benchmark devices over MQTT (one, several, or --all)",
        description="Send cmd/benchmark to devices through the broker and collect their results.")
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", "-d", action="append", metavar="ID", help="a device id (repeatable)")
    who.add_argument("--all", action="store_true", help="every device online (fleet topic)")
    who.add_argument("--group", "-g", metavar="TAG", help="the online devices whose agent.tags include TAG")
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
                   help="seconds to discover devices (retained states, presence answers) before "
                        "sending (default 1)")
    p.add_argument("--csv", metavar="FILE", help="write one row per device as CSV")
    p.add_argument("--json", metavar="FILE", help="write every answer (full results) as JSON")
    p.add_argument("--plot", metavar="FILE.png", help="PNG of the latency distribution per device (matplotlib)")
    p.add_argument("--progress", choices=("auto", "bar", "text", "none"), default="auto",
                   help="progress display on stderr (default: bar with tqdm on a terminal, else text)")
    add_broker_arguments(p)
    p.set_defaults(func=cmd_remote_bench)


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
    params = command_params(args.runs, args.warmup, args.pipeline, args.pause, args.input, args.frame_size,
                            threads=args.threads, model=args.model, min_secs=args.min_secs,
                            max_secs=args.max_secs)
    with FleetClient(mqtt) as client:
        devices = _discover(client, args.discover_s)
        if args.all and not any(d.online for d in devices.values()):
            print(f"no device online under {mqtt.topic_prefix}/ (retained availability, presence query); "
                  f"waiting for unannounced devices anyway", file=sys.stderr)
        progress = Progress("none" if args.progress == "none" else args.progress, args.runs, args.warmup)
        try:
            report = run_bench(client, params, devices=_who(args, devices), fleet=args.all, timeout=args.timeout,
                               on_message=progress)
        finally:
            progress.close()
    rows = summary_rows(report)
    print(format_table(rows, TABLE_COLUMNS) if rows else "no device answered", file=out)
    if args.csv:
        _write(args.csv, lambda fh: write_csv(rows, fh))
    if args.json:
        _write(args.json, lambda fh: fh.write(json.dumps(report, indent=2) + "\n"))
    if args.plot:
        plot_latencies(report, args.plot)
        print(f"plot: {args.plot}", file=sys.stderr)
    return 0 if rows and all(r["status"] == "done" for r in rows) else 1




def _targets(p: argparse.ArgumentParser) -> None:
    who = p.add_mutually_exclusive_group(required=True)
    who.add_argument("--device", "-d", action="append", metavar="ID", help="a device id (repeatable)")
    who.add_argument("--all", action="store_true", help="every device online (fleet topic)")
    who.add_argument("--group", "-g", metavar="TAG", help="the online devices whose agent.tags include TAG")
    p.add_argument("--discover-s", type=float, default=DISCOVERY_S,
                   help="seconds to discover devices (retained states, presence answers) before "
                        "sending (default 1)")
    add_broker_arguments(p)


def _add_devices(remote: Any) -> None:
    p = remote.add_parser("devices", help="list the devices under the topic prefix (retained state + presence)",
                          description="Discover devices from their retained availability/info and a presence "
                                      "query every agent answers; print one row per device.")
    p.add_argument("--discover-s", type=float, default=2.0, help="seconds to wait for answers (default 2)")
    p.add_argument("--json", action="store_true", help="print the devices as JSON")
    add_broker_arguments(p)
    p.set_defaults(func=cmd_devices)


def cmd_devices(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    with FleetClient(mqtt_from_args(args)) as client:
        devices = _discover(client, args.discover_s)
    if args.json:
        print(json.dumps({d.id: {"online": d.online, "via": list(d.via), "info": d.info}
                          for d in devices.values()}, indent=2), file=out)
    else:
        rows = [device_row(d) for d in devices.values()]
        print(format_table(rows, DEVICE_COLUMNS) if rows else "no device found", file=out)
    return 0 if devices else 1


def _add_deploy(remote: Any) -> None:
    p = remote.add_parser("deploy", help="deploy a .tflite model to devices (verified, atomic, rollback)",
                          description="Send a model to devices over MQTT (inline chunks, or a URL the "
                                      "devices download); each verifies, test-runs and swaps it in.")
    p.add_argument("file", metavar="FILE", help="the .tflite model")
    _targets(p)
    p.add_argument("--name", help="model name (default: the file name without .tflite)")
    p.add_argument("--labels", metavar="FILE", help="class names, one a line (default: the device's "
                                                    "manifest labels for known models)")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="BYTES",
                   help=f"inline transfer chunk size (default {DEFAULT_CHUNK_SIZE})")
    p.add_argument("--url", help="let the devices download FILE from this http(s) URL instead")
    p.add_argument("--sign-key", metavar="FILE", help="ed25519 private key (PEM or base64 seed) to sign with")
    p.add_argument("--sample", metavar="IMAGE", help="image for the device's sanity invoke")
    p.add_argument("--golden", metavar="MASK.png", help="class-id mask expected on --sample")
    p.add_argument("--min-agreement", type=float, default=None, help="with --golden (default 0.9)")
    p.add_argument("--confirm-frames", type=int, default=None,
                   help="live frames the new model must process before it is confirmed (default 5)")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for all answers (default 300)")
    p.set_defaults(func=cmd_deploy)

    rb = remote.add_parser("rollback", help="switch devices back to their previous model")
    _targets(rb)
    rb.add_argument("--to", help="a model name or sha256 in the device's store (default: the previous one)")
    rb.add_argument("--timeout", type=float, default=120.0)
    rb.set_defaults(func=cmd_rollback)

    ls = remote.add_parser("models", help="list the models in the devices' stores")
    _targets(ls)
    ls.add_argument("--timeout", type=float, default=20.0)
    ls.set_defaults(func=cmd_models)


def cmd_deploy(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    data = _read(args.file, "model")
    sign_key = None
    if args.sign_key:
        from edge_agent.models import signing

        sign_key = signing.load_private_key(args.sign_key)
    params = deploy_params(
        data, args.name or Path(args.file).stem, labels=read_labels(args.labels) if args.labels else None,
        url=args.url, chunk_size=args.chunk_size, sign_key=sign_key,
        sample=_read(args.sample, "sample image") if args.sample else None,
        golden_mask=_read(args.golden, "golden mask") if args.golden else None,
        min_agreement=args.min_agreement, confirm_frames=args.confirm_frames)
    with FleetClient(mqtt_from_args(args)) as client:
        found = _discover(client, args.discover_s)
        answers = deploy(client, params, data, devices=_who(args, found), fleet=args.all,
                         timeout=args.timeout, on_message=_print_progress)
    return report_deploy_answers(answers, out)




def _add_rollout(remote: Any) -> None:
    p = remote.add_parser(
        "rollout", help="deploy a model in stages, each judged on its devices; roll back on a failed gate",
        description="Staged rollout: deploy FILE to the selected devices stage by stage (--stages), let each "
                    "stage run for --soak-s, compare every device's fps and inference p50 after the swap "
                    "with before, and stop and roll back every device changed so far when a gate fails. "
                    "The state is kept in --state (JSON) after every step: --resume continues it; Ctrl-C "
                    "cancels and rolls back.")
    p.add_argument("file", metavar="FILE", nargs="?", help="the .tflite model (not with --resume)")
    who = p.add_mutually_exclusive_group()
    who.add_argument("--device", "-d", action="append", metavar="ID", help="a device id (repeatable)")
    who.add_argument("--all", action="store_true", help="every device online")
    who.add_argument("--group", "-g", metavar="TAG", help="the online devices whose agent.tags include TAG")
    p.add_argument("--stages", default="1,50%,100%",
                   help="cumulative devices per stage: counts or percentages (default 1,50%%,100%%)")
    p.add_argument("--soak-s", type=float, default=60.0, help="seconds each stage runs before its gates (default 60)")
    p.add_argument("--baseline-s", type=float, default=15.0,
                   help="seconds of reports before a swap that make the baseline (default 15)")
    p.add_argument("--fps-ratio", type=float, default=0.8,
                   help="gate: fps after >= this x before (default 0.8; 0: not checked)")
    p.add_argument("--p50-ratio", type=float, default=1.2,
                   help="gate: inference p50 after <= this x before (default 1.2; 0: not checked)")
    p.add_argument("--state", metavar="FILE.json", default="rollout.json",
                   help="where the rollout's state is kept (default rollout.json)")
    p.add_argument("--resume", action="store_true", help="continue the rollout of --state")
    p.add_argument("--name", help="model name (default: the file name without .tflite)")
    p.add_argument("--sign-key", metavar="FILE", help="ed25519 private key (PEM or base64 seed) to sign with")
    p.add_argument("--chunk-size", type=int, default=DEFAULT_CHUNK_SIZE, metavar="BYTES")
    p.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for each stage's deployment")
    p.add_argument("--discover-s", type=float, default=DISCOVERY_S, help="seconds to discover devices (default 1)")
    add_broker_arguments(p)
    p.set_defaults(func=cmd_rollout)


def cmd_rollout(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    from edge_agent.fleet.rollout import Gates, Rollout, RolloutState

    out = out or sys.stdout
    state_path = Path(args.state)
    if args.resume == bool(args.file):
        raise EdgeAgentError("give FILE for a new rollout, or --resume to continue the one in --state")
    if not args.resume and not (args.device or args.all or args.group):
        raise EdgeAgentError("say which devices: --device ID, --group TAG or --all")
    if not args.resume and state_path.exists():
        raise EdgeAgentError(f"--state {state_path} exists: --resume it, or choose another --state")
    data = _read(args.file, "model") if args.file else None
    sign_key = None
    if args.sign_key:
        from edge_agent.models import signing

        sign_key = signing.load_private_key(args.sign_key)
    with FleetClient(mqtt_from_args(args)) as client:
        found = _discover(client, args.discover_s)
        if args.resume:
            state = RolloutState.load(state_path)
            model_file = state.model.get("file")
            if not model_file:
                raise EdgeAgentError(f"--state {state_path} does not name its model file")
            data = _read(model_file, "model")
            params = deploy_params(data, state.model["name"], chunk_size=state.model.get("chunk_size", args.chunk_size),
                                   sign_key=sign_key)
            if params["sha256"] != state.model["sha256"]:
                raise EdgeAgentError(f"{model_file} is not the model of this rollout (sha256 changed)")
        else:
            devices = (_who(args, found) if not args.all else
                       sorted(d.id for d in found.values() if d.online))
            if not devices:
                raise EdgeAgentError("no device online to roll out to")
            gates = Gates(fps_ratio=args.fps_ratio or None, p50_ratio=args.p50_ratio or None)  # 0: not checked
            params = deploy_params(data, args.name or Path(args.file).stem, chunk_size=args.chunk_size,
                                   sign_key=sign_key)
            state = Rollout.plan(devices, args.stages, params, gates, args.soak_s)
            state.model["file"] = str(Path(args.file).resolve())
            state.model["chunk_size"] = args.chunk_size
        rollout = Rollout(client, state, state_path, params, data, baseline_s=args.baseline_s,
                          deploy_timeout_s=args.timeout, out=lambda line: print(line, file=out, flush=True))
        return rollout.run()


def cmd_rollback(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    with FleetClient(mqtt_from_args(args)) as client:
        found = _discover(client, args.discover_s)
        answers = rollback(client, args.to, devices=_who(args, found), fleet=args.all, timeout=args.timeout,
                           on_message=_print_progress)
    return report_deploy_answers(answers, out)


def cmd_models(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    out = out or sys.stdout
    with FleetClient(mqtt_from_args(args)) as client:
        found = _discover(client, args.discover_s)
        answers = list_models(client, devices=_who(args, found), fleet=args.all, timeout=args.timeout)
    return report_model_answers(answers, out)


# -- files and progress lines of the remote commands -------------------------------------------

def _read(path: str, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise EdgeAgentError(f"{path}: cannot read the {what} ({exc.strerror})") from None


def _write(path: str, write: Any) -> None:
    try:
        with open(path, "w", encoding="utf-8", newline="") as fh:
            write(fh)
    except OSError as exc:
        raise EdgeAgentError(f"{path}: cannot write ({exc.strerror})") from None


def _print_progress(device: str, doc: Dict[str, Any]) -> None:
    status = doc.get("status")
    if status == "progress":
        stage = doc.get("stage")
        extra = f" {doc['received']}/{doc['total']} bytes" if "received" in doc else ""
        print(f"{device}: {stage}{extra}", file=sys.stderr)
    elif status == "accepted":
        print(f"{device}: accepted", file=sys.stderr)
