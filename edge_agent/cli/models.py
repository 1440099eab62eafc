"""``edge-agent models list|fetch``: the manifest's models, fetched and sha256-verified."""

from __future__ import annotations

import sys

from edge_agent.models.catalog import ENV_MODELS_DIR, ProgressLog, fetch, load_manifest, models_dir


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("models", help="list and fetch the models of the manifest")
    sub = p.add_subparsers(dest="models_cmd", required=True, metavar="{list,fetch}")
    ls = sub.add_parser("list", help="list the manifest's models and whether they are fetched")
    ls.add_argument("--manifest", help="manifest file (default: the packaged manifest)")
    ls.add_argument("--dest", help=f"models directory (default: ${ENV_MODELS_DIR} or ~/.cache/edge-agent/models)")
    ls.set_defaults(func=_cmd_list)
    fe = sub.add_parser("fetch", help="download (or copy from --mirror) and verify sha256")
    fe.add_argument("names", nargs="*", help="model names (default: all)")
    fe.add_argument("--mirror", help="local directory holding the files (offline)")
    fe.add_argument("--dest", help="models directory")
    fe.add_argument("--manifest", help="manifest file")
    fe.add_argument("--force", action="store_true", help="fetch even if a verified copy exists")
    fe.set_defaults(func=_cmd_fetch)


def _cmd_list(args) -> int:
    manifest = load_manifest(args.manifest)
    directory = models_dir(args.dest)
    for entry in manifest.models.values():
        present = (directory / entry.file).is_file()
        size = f"{entry.size / 1e6:.1f} MB" if entry.size else "?"
        tag = " [edgetpu]" if entry.edgetpu else ""
        print(f"{'*' if present else ' '} {entry.name:45s} {size:>8s}{tag}  {entry.description}")
    print(f"(* = fetched into {directory})")
    return 0


def _cmd_fetch(args) -> int:
    manifest = load_manifest(args.manifest)
    names = args.names or list(manifest.models)
    entries = [manifest.get(n) for n in names]  # validate every name before fetching any
    for entry in entries:
        tty = sys.stderr.isatty()
        progress = ProgressLog(entry.name, lambda text: print(text, end="" if tty else "\n",
                                                              file=sys.stderr, flush=True),
                               every_s=0.2 if tty else 2.0, overwrite=tty)
        path = fetch(entry, args.dest, args.mirror, args.force, progress=progress)
        print(f"{entry.name}: {path} (sha256 ok)")
    return 0
