"""``edge-agent segment IMAGE...``: masks and overlays for still images, one summary line each."""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Dict, List

import cv2
import numpy as np

from edge_agent.models import catalog

from edge_agent.inference import runtimes
from edge_agent.errors import EdgeAgentError
from edge_agent.inference.postprocess import class_fractions
from edge_agent.inference.preprocess import MODES
from edge_agent.config import ModelConfig
from edge_agent.inference.model import ModelOptions
from edge_agent.inference.segmenter import ModelSettings, Segmenter
from edge_agent.output.encode import encode_mask_png
from edge_agent.output.visuals import overlay
from edge_agent.sources.images import read_image


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1 (``--threads -3`` is a usage error, exit 2)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return value


def write_png(path: Path, image: np.ndarray, rgb: bool = False) -> None:
    data = cv2.cvtColor(image, cv2.COLOR_RGB2BGR) if rgb else image
    try:
        ok = cv2.imwrite(str(path), data)
    except cv2.error:
        ok = False
    if not ok:
        raise EdgeAgentError(f"{path}: cannot write image")


def add_runtime_option(p) -> None:
    """--runtime: the runtime registry's names (built-in and plugins) or auto."""
    p.add_argument("--runtime", default="auto", choices=runtimes.choices(),
                   help="TFLite runtime (default: fastest installed; env EDGE_AGENT_RUNTIME)")
def write_mask(path: Path, mask: np.ndarray) -> None:
    """The mask as the agent publishes it: a palette PNG whose pixel values are the class ids."""
    try:
        path.write_bytes(encode_mask_png(np.ascontiguousarray(mask)))
    except OSError as exc:
        raise EdgeAgentError(f"{path}: cannot write mask ({exc.strerror})") from None


def add_runtime_args(p) -> None:
    """Model/runtime options shared by segment, bench and run."""
    p.add_argument("--model", "-m", required=True, help="a .tflite path or a manifest model name")
    p.add_argument("--labels", help="label file (default: from the manifest when the model is known)")
    add_runtime_option(p)
    p.add_argument("--threads", type=positive_int, default=None, help="interpreter threads (default: CPU count)")
    p.add_argument("--edgetpu", nargs="?", const="", default=None, metavar="DEVICE",
                   help="use the Coral Edge TPU delegate (DEVICE: usb, usb:N, pci, pci:N, :N)")
    p.add_argument("--cpu-fallback", help="CPU model (path or manifest name) to use when the Edge TPU (or its model) cannot run")
    p.add_argument("--mode", default="letterbox", choices=MODES, help="preprocessing")
    add_model_args(p)


def add_model_args(p) -> None:
    """CLI flags for :class:`ModelOptions` (the ``[model]`` keys of the same names)."""
    g = p.add_argument_group("model interpretation (only when the model's metadata does not say it)")
    g.add_argument("--normalization", choices=["-1..1", "0..1", "raw"], default="",
                   help="range pixels 0..255 are mapped to (default: metadata, input quantization, -1..1)")
    g.add_argument("--input-mean", default="", metavar="M[,M,M]", help="per-channel mean: real = (pixel - mean) / std")
    g.add_argument("--input-std", default="", metavar="S[,S,S]", help="per-channel std (with --input-mean)")
    g.add_argument("--output-layout", choices=["auto", "nhwc", "nchw"], default="auto",
                   help="where the class axis of score outputs is (default: auto, refused when ambiguous)")
    g.add_argument("--output-tensor", dest="output", default="", metavar="NAME",
                   help="output tensor to read when the model has several")
    g.add_argument("--output-scores", choices=["auto", "probability", "logit"], default="auto",
                   help="single-channel maps: probabilities or logits (default: from the graph/metadata)")
    g.add_argument("--threshold", type=float, default=0.5,
                   help="single-channel maps: foreground above this probability (default 0.5)")


def model_options(args) -> ModelOptions:
    """The ``[model]`` interpretation flags as the config section they mirror, then its options."""
    keys = {f.name for f in dataclasses.fields(ModelOptions)}
    return ModelOptions.from_config(ModelConfig(**{k: getattr(args, k) for k in keys if hasattr(args, k)}))


def model_settings(args) -> ModelSettings:
    """The runtime options of :func:`add_runtime_args`, once."""
    return ModelSettings(runtime=args.runtime, threads=args.threads, edgetpu=args.edgetpu,
                         cpu_fallback=catalog.resolve(args.cpu_fallback).path if args.cpu_fallback else None,
                         mode=args.mode, options=model_options(args))


def make_segmenter(args) -> Segmenter:
    """``--model`` (path or manifest name, with its labels unless ``--labels``) as a segmenter."""
    resolved = catalog.resolve(args.model)
    return Segmenter.from_settings(resolved.path, args.labels or resolved.labels, model_settings(args))


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("segment", help="segment image files: mask PNG + overlay PNG per image")
    p.add_argument("images", nargs="+", metavar="IMAGE")
    add_runtime_args(p)
    p.add_argument("--out", default="out", help="output directory (default: ./out)")
    p.set_defaults(func=run)


def summary_line(name: str, frame_shape, fractions, timings, runtime: str, top: int = 5) -> str:
    classes = ", ".join(f"{k} {v * 100:.1f}%" for k, v in list(fractions.items())[:top])
    times = ", ".join(f"{k} {v:.1f} ms" for k, v in timings.items())
    h, w = frame_shape[:2]
    return f"{name} {w}x{h}: {classes} | {times} | {runtime}"


def output_stems(paths: List[str]) -> Dict[str, str]:
    """Each image's output name: its stem, or as many of its parent folders as make it unique
    where images share a stem (``a/x.bmp``, ``b/x.bmp`` -> ``a_x``, ``b_x``), so no result is
    written over another. ``paths`` are distinct."""
    parts = {p: Path(os.path.abspath(p)).with_suffix("").parts[1:] for p in paths}
    depth = {p: 1 for p in paths}
    while True:
        names = {p: "_".join(parts[p][-depth[p]:]) for p in paths}
        clashing = [p for p in paths if list(names.values()).count(names[p]) > 1]
        if not clashing:
            return names
        for p in clashing:
            depth[p] += 1  # distinct absolute paths differ somewhere: this ends


def prepare_out_dir(out: str) -> Path:
    """``--out`` made usable before any work, or one line saying why not."""
    out_dir = Path(out)
    if out_dir.exists() and not out_dir.is_dir():
        raise EdgeAgentError(f"--out {out}: exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise EdgeAgentError(f"--out {out}: cannot create the directory ({exc.strerror})") from None
    if not os.access(out_dir, os.W_OK):
        raise EdgeAgentError(f"--out {out}: the directory is not writable")
    return out_dir


def run(args) -> int:
    # Read every image first: a bad path fails before the model is loaded.
    for path in args.images:
        if os.path.isdir(path):
            raise EdgeAgentError(f"{path}: is a directory; name the images (e.g. {path.rstrip('/')}/*.jpg)")
    paths = list(dict.fromkeys(args.images))  # the same image named twice: once
    frames = [(path, read_image(path)) for path in paths]
    stems = output_stems(paths)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        raise EdgeAgentError(f"--out {args.out}: exists and is not a directory")
    segmenter = make_segmenter(args)  # a refused model leaves no output directory behind
    out_dir = prepare_out_dir(args.out)
    runtime = segmenter.describe_runtime()
    for path, frame in frames:
        result = segmenter.segment(frame)
        stem = stems[path]
        write_mask(out_dir / f"{stem}_mask.png", result.mask)
        write_png(out_dir / f"{stem}_overlay.png", overlay(frame, result.mask, labels=segmenter.labels), rgb=True)
        fractions = class_fractions(result.mask, segmenter.labels)
        print(summary_line(stem + Path(path).suffix, frame.shape, fractions, result.timings, runtime),
              flush=True)
    return 0
