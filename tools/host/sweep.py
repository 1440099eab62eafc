"""``edge-agent host sweep``: choose a DeepLab model by measurement.

From one or more DeepLab sources (Coral's uint8 models, the float original: each brings its own
depth multiplier, the only one rebuilding can give), every candidate ``input size x scheme`` is
built (rebuild at that size, then PTQ per-channel / per-tensor with the equalization + analytic
bias correction cure / fp16, QAT only when asked), evaluated on a labelled dataset (mIoU through
the agent's own ``Segmenter``, calibration images never among the evaluated ones) and
benchmarked:

* on real devices through the broker (``--device``, repeatable): each candidate is staged in the
  device's model store without becoming current (``cmd/deploy`` ``activate: false``),
  benchmarked by sha256 (``cmd/benchmark`` ``model``, ``pipeline: true``: invoke and end-to-end
  p50 as ``remote bench`` reports them) and removed again (``cmd/models`` ``remove``) unless
  ``--keep`` or it was there before;
* or locally (the agent's runtime in this process) when no device is named.

Writes ``sweep.csv``, ``sweep.json`` and ``pareto.png`` (mIoU vs p50) into ``--out``; with
``--target-fps`` / ``--max-latency-ms`` picks the most accurate candidate that meets the target on
every device (``--deploy`` deploys it, signed with ``--sign-key``). Resumable: ``sweep_cache.json``
in ``--out`` remembers every built model, evaluation and benchmark by source sha256 + size +
scheme + calibration + dataset (+ device and benchmark settings); those steps are not redone.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from tqdm import tqdm

from edge_agent.errors import ConfigError, EdgeAgentError

from . import metrics
from .datasets import IMAGE_SUFFIXES, DatasetError, VocDataset, image_files, read_label, read_rgb

DEFAULT_SIZES = (513, 449, 385, 321, 257)
# scheme -> PTQOptions fields (None: QAT). "per-tensor": plain per-tensor weights (same graph and
# speed as per-channel); "per-tensor-s8": + 8 subtensors, the per-tensor cure that holds on data it
# was not tuned on (2.6x slower on a CPU). Equalization and bias correction are not in any scheme:
# their gain on held-out images is within noise (docs/host-tools.md, "Held out").
SCHEMES: Dict[str, Optional[Dict[str, Any]]] = {
    "per-channel": {},
    "per-tensor": {"per_channel": False},
    "per-tensor-s8": {"per_channel": False, "subtensors": 8},
    "fp16": {"mode": "float16"},
    "qat": None,
}
DEFAULT_SCHEMES = ("per-channel", "per-tensor", "fp16")
LATENCY_METRICS = {"end_to_end": "end-to-end", "invoke": "invoke"}
CACHE_FILE = "sweep_cache.json"
CACHE_VERSION = 1
LOCAL = "local"


class SweepError(EdgeAgentError):
    """A sweep step failed for a reason the user can act on."""


def sha256_file(path: "str | Path") -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fingerprint(parts: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------- data


@dataclass
class Sample:
    id: str
    image: Path
    label: Path


@dataclass
class Data:
    """Evaluation pairs and calibration images: disjoint by construction (checked by content)."""

    eval_samples: List[Sample]
    calib_images: List[Path]
    split: str  # one sentence for the table and the docs
    fingerprint: str  # evaluation set (file contents)
    calib_fingerprint: str

    def calibration_arrays(self) -> List[np.ndarray]:
        return [read_rgb(p) for p in self.calib_images]


def pair_samples(folder: "str | Path") -> List[Sample]:
    """Image/mask pairs of a folder: ``images/<stem>.*`` with ``masks/<stem>.png``, or
    ``<stem>.<ext>`` with ``<stem>_mask.png|bmp`` side by side (masks: class ids, 255 = ignore)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"pairs folder not found: {folder}")
    samples = []
    if (folder / "images").is_dir() and (folder / "masks").is_dir():
        for image in image_files(folder / "images"):
            mask = next((folder / "masks" / f"{image.stem}{s}" for s in (".png", ".bmp")
                         if (folder / "masks" / f"{image.stem}{s}").is_file()), None)
            if mask is not None:
                samples.append(Sample(image.stem, image, mask))
    else:
        for image in sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES
                            and not p.stem.endswith("_mask")):
            mask = next((folder / f"{image.stem}_mask{s}" for s in (".png", ".bmp")
                         if (folder / f"{image.stem}_mask{s}").is_file()), None)
            if mask is not None:
                samples.append(Sample(image.stem, image, mask))
    if not samples:
        raise DatasetError(f"{folder}: no image/mask pairs (images/ + masks/, or <name>.jpg + "
                           f"<name>_mask.png)")
    return samples


def load_data(voc: Optional[str], split: str, pairs: Optional[str], calib: Optional[str],
              num_calib: int) -> Data:
    """The evaluation pairs and the calibration images.

    With ``calib`` (an image folder) the calibration images come from there, minus any whose
    content equals an evaluation image; without it the first ``num_calib`` pairs (sorted by id)
    are held out for calibration and the rest are evaluated.
    """
    if (voc is None) == (pairs is None):
        raise ConfigError("give the labelled dataset as --voc DIR or --pairs DIR (one of them)")
    if num_calib < 1:
        raise ConfigError(f"--num-calib must be >= 1, not {num_calib}")
    if voc is not None:
        samples = [Sample(s.id, s.image_path, s.label_path) for s in VocDataset(voc, split).samples]
        where = f"{Path(voc).name} {split} ({len(samples)} pairs)"
    else:
        samples = pair_samples(pairs)
        where = f"{Path(pairs).name} ({len(samples)} pairs)"
    samples.sort(key=lambda s: s.id)
    eval_hashes = {sha256_file(s.image): s.id for s in samples}
    if calib:
        files = image_files(calib)
        kept = [p for p in files if sha256_file(p) not in eval_hashes]
        excluded = len(files) - len(kept)
        calib_images = kept[:num_calib]
        if not calib_images:
            raise ConfigError(f"--calib {calib}: every image is also an evaluation image")
        split_text = (f"calibration: {len(calib_images)} images of {Path(calib).name}/"
                      + (f" ({excluded} equal to evaluation images left out)" if excluded else "")
                      + f"; evaluation: all {len(samples)} pairs of {where}")
    else:
        if len(samples) <= num_calib:
            raise ConfigError(f"{where}: {len(samples)} pairs cannot hold out {num_calib} for "
                              f"calibration and still evaluate (lower --num-calib or give --calib)")
        held, samples = samples[:num_calib], samples[num_calib:]
        calib_images = [s.image for s in held]
        split_text = (f"calibration: the first {len(held)} pairs of {where} by id "
                      f"({', '.join(s.id for s in held)}), images only; evaluation: the other "
                      f"{len(samples)}")
    fp = _fingerprint([f"{s.id}:{sha256_file(s.image)}:{sha256_file(s.label)}" for s in samples])
    calib_fp = _fingerprint([sha256_file(p) for p in calib_images])
    return Data(samples, calib_images, split_text, fp, calib_fp)


# ------------------------------------------------------------------------------------- cache


class Cache:
    """``sweep_cache.json``: step results by key, written after every step (atomic replace)."""

    def __init__(self, out: Path) -> None:
        self.path = out / CACHE_FILE
        self.entries: Dict[str, Any] = {}
        if self.path.is_file():
            try:
                doc = json.loads(self.path.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                doc = {}
            if doc.get("version") == CACHE_VERSION:
                self.entries = doc.get("entries", {})

    def get(self, key: str) -> Optional[Dict[str, Any]]:
        return self.entries.get(key)

    def put(self, key: str, value: Dict[str, Any]) -> None:
        self.entries[key] = value
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": self.entries}, indent=1,
                                  sort_keys=True), encoding="utf-8")
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------- candidates


@dataclass
class Source:
    path: Path
    sha256: str
    depth_multiplier: float
    native_size: Tuple[int, int]


@dataclass
class Candidate:
    source: Source
    size: int
    scheme: str
    file: Optional[Path] = None
    sha256: Optional[str] = None
    size_bytes: Optional[int] = None
    miou: Optional[float] = None
    pixel_acc: Optional[float] = None
    latency: Dict[str, Dict[str, Any]] = field(default_factory=dict)  # target -> p50s etc.

    @property
    def label(self) -> str:
        return f"dm{self.source.depth_multiplier:g}-{self.size}-{self.scheme}"

    @property
    def build_key(self) -> str:
        spec = json.dumps(SCHEMES.get(self.scheme), sort_keys=True)  # a changed recipe rebuilds
        return f"build:{self.source.sha256}:{self.size}:{self.scheme}:{spec}"

    def worst(self, metric: str) -> Tuple[Optional[float], Optional[str]]:
        """The largest p50 of ``metric`` over the targets, and where; (None, target) if one lacks it."""
        worst, where = None, None
        for target, lat in sorted(self.latency.items()):
            value = lat.get(f"p50_{metric}_ms")
            if value is None:
                return None, target
            if worst is None or value > worst:
                worst, where = value, target
        return worst, where


def read_source(path: "str | Path") -> Source:
    from .rebuild import conv_ops, infer_config
    from .tflite_reader import read_tflite

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"source model not found: {path}")
    graph = read_tflite(path)
    cfg = infer_config(graph, conv_ops(graph))
    return Source(path, sha256_file(path), cfg.depth_multiplier, tuple(cfg.input_size))


def candidates(sources: Sequence[Source], sizes: Sequence[int], schemes: Sequence[str]
               ) -> List[Candidate]:
    for s in schemes:
        if s not in SCHEMES:
            raise ConfigError(f"unknown scheme {s!r}: choose {', '.join(SCHEMES)}")
    for size in sizes:
        if size < 33:
            raise ConfigError(f"input size {size} is too small (>= 33)")
    return [Candidate(src, size, scheme) for src in sources for size in sizes for scheme in schemes]


@dataclass
class Settings:
    out: Path
    num_calib: int = 8
    threads: Optional[int] = None
    runs: int = 20
    warmup: int = 2
    metric: str = "end_to_end"
    frame_size: Tuple[int, int] = (640, 480)
    qat_voc: Optional[str] = None
    qat_split: str = "train"
    qat_steps: int = 200
    labels: Optional[List[str]] = None
    eval_images: Dict[str, str] = field(default_factory=dict)  # sha256 -> id: never trained on


Log = Callable[[str], None]


def build(cands: Sequence[Candidate], data: Data, cache: Cache, st: Settings, log: Log) -> None:
    """Build every candidate's .tflite (or take it from the cache when its file is intact)."""
    models_dir = st.out / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    calib: Optional[List[np.ndarray]] = None
    rebuilt: Dict[Tuple[str, int], Any] = {}
    for c in tqdm(cands, desc="build", unit="model"):
        key = f"{c.build_key}:{data.calib_fingerprint}"
        hit = cache.get(key)
        path = models_dir / f"{c.label}.tflite"
        if hit and path.is_file() and sha256_file(path) == hit["sha256"]:
            c.file, c.sha256, c.size_bytes = path, hit["sha256"], hit["size_bytes"]
            log(f"cached: {c.label} built ({c.sha256[:12]})")
            continue
        t0 = time.monotonic()
        log(f"building {c.label}")
        if calib is None:
            calib = data.calibration_arrays()
        model_key = (c.source.sha256, c.size)
        if model_key not in rebuilt:
            from .rebuild import rebuild

            rebuilt.clear()  # one float model at a time: memory
            rebuilt[model_key] = rebuild(c.source.path, input_size=(c.size, c.size), argmax=False)[0]
        payload = _quantize(rebuilt[model_key], c.scheme, calib, st, log)
        path.write_bytes(payload)
        c.file, c.sha256, c.size_bytes = path, sha256_file(path), path.stat().st_size
        cache.put(key, {"sha256": c.sha256, "size_bytes": c.size_bytes, "file": path.name,
                        "build_s": round(time.monotonic() - t0, 1)})


def _quantize(model: Any, scheme: str, calib: List[np.ndarray], st: Settings, log: Log) -> bytes:
    from .ptq import PTQOptions, quantize_keras

    spec = SCHEMES[scheme]
    if spec is None:
        return _qat(model, calib, st, log)
    opts = PTQOptions(**spec).validate()
    images = calib if opts.mode == "int8" else []
    return quantize_keras(model, opts, images)


def _qat(model: Any, calib: List[np.ndarray], st: Settings, log: Log) -> bytes:
    from . import qat

    if not st.qat_voc:
        raise ConfigError("the qat scheme trains on labelled data: give --qat-voc DIR (with "
                          "--qat-split, never the evaluation split)")
    dataset = VocDataset(st.qat_voc, st.qat_split)
    shared = sorted({st.eval_images[h] for h in (sha256_file(s.image_path) for s in dataset.samples)
                     if h in st.eval_images})
    if shared:
        raise ConfigError(f"--qat-voc {st.qat_voc} {st.qat_split}: {len(shared)} training image(s) "
                          f"are evaluation images ({', '.join(shared[:5])}): train on another split")
    qmodel = qat.fine_tune(model, dataset, qat.QATOptions(steps=st.qat_steps, batch_size=2),
                           log=log)
    return qat.export(qmodel, calib)


def evaluate(cands: Sequence[Candidate], data: Data, cache: Cache, st: Settings, log: Log) -> None:
    """mIoU and pixel accuracy of every candidate on the evaluation pairs (agent's Segmenter)."""
    from edge_agent.inference.segmenter import Segmenter

    for c in tqdm(cands, desc="evaluate", unit="model"):
        key = f"eval:{c.sha256}:{data.fingerprint}"
        hit = cache.get(key)
        if hit:
            c.miou, c.pixel_acc = hit["miou"], hit["pixel_acc"]
            log(f"cached: {c.label} evaluated (mIoU {100 * c.miou:.2f})")
            continue
        seg = Segmenter(str(c.file), runtime="auto", threads=st.threads)
        n = 21 if not seg.labels else max(21, len(seg.labels))
        conf = np.zeros((n, n), np.int64)
        for s in tqdm(data.eval_samples, desc=c.label, unit="img", leave=False):
            mask = seg.segment(read_rgb(s.image)).mask
            conf += metrics.confusion(mask, read_label(s.label), n)
        summary = metrics.summarize(conf)
        c.miou, c.pixel_acc = summary["miou"], summary["pixel_acc"]
        cache.put(key, {"miou": c.miou, "pixel_acc": c.pixel_acc, "images": len(data.eval_samples)})
        del seg


def _p50s(result: Dict[str, Any]) -> Dict[str, Any]:
    stages = result.get("stages") or {}
    return {"p50_invoke_ms": (result.get("invoke") or {}).get("p50"),
            "p50_end_to_end_ms": (stages.get("end_to_end") or {}).get("p50"),
            "runtime": " ".join(str(x) for x in (result.get("runtime"), result.get("runtime_version"))
                                if x) or None,
            "threads": result.get("threads"), "runs": (result.get("invoke") or {}).get("count")}


def _bench_settings_key(st: Settings) -> str:
    return f"{st.runs}:{st.warmup}:{st.threads}:{st.frame_size[0]}x{st.frame_size[1]}"


def bench_local(cands: Sequence[Candidate], cache: Cache, st: Settings, log: Log) -> None:
    """p50 invoke and end-to-end in this process (the agent's runtime, ``pipeline`` timing)."""
    from edge_agent.inference.segmenter import Segmenter
    from edge_agent.output.benchmark import BenchSettings, run_benchmark

    target = LOCAL
    for c in tqdm(cands, desc="benchmark local", unit="model"):
        key = f"bench:{c.sha256}:{target}:{platform.node()}:{_bench_settings_key(st)}"
        hit = cache.get(key)
        if hit:
            c.latency[target] = hit
            log(f"cached: {c.label} benchmarked locally")
            continue
        seg = Segmenter(str(c.file), runtime="auto", threads=st.threads)
        result = run_benchmark(seg, BenchSettings(runs=st.runs, warmup=st.warmup, pipeline=True,
                                                  frame_size=st.frame_size, samples=False))
        c.latency[target] = _p50s(result)
        cache.put(key, c.latency[target])
        del seg


def bench_devices(cands: Sequence[Candidate], devices: Sequence[str], client: Any, cache: Cache,
                  st: Settings, log: Log, sign_key: Any = None, keep: bool = False,
                  timeout: float = 300.0) -> None:
    """Stage each candidate on the devices (not current), benchmark it by sha256, remove it."""
    from edge_agent.fleet import bench as fleet_bench
    from edge_agent.fleet.deploy import deploy, deploy_params, list_models

    for c in tqdm(cands, desc="benchmark devices", unit="model"):
        todo = []
        for dev in devices:
            hit = cache.get(f"bench:{c.sha256}:device:{dev}:{_bench_settings_key(st)}")
            if hit:
                c.latency[dev] = hit
                log(f"cached: {c.label} benchmarked on {dev}")
            else:
                todo.append(dev)
        if not todo:
            continue
        before = _store_shas(list_models(client, devices=todo, timeout=30), "before staging")
        data = c.file.read_bytes()
        params = deploy_params(data, f"sweep-{c.label}", labels=st.labels, sign_key=sign_key,
                               activate=False)
        answers = deploy(client, params, data, devices=todo, timeout=timeout)
        staged, running, failed = [], [], []
        for dev, answer in answers.items():
            if not answer.ok:
                failed.append(f"{dev}: staging {c.label} failed: {answer.status}"
                              f"{': ' + answer.reason if answer.reason else ''}")
            else:
                (running if answer.final.get("state") == "active" else staged).append(dev)
        try:
            if failed:  # the devices that did stage it are cleaned up below all the same
                raise SweepError("; ".join(failed))
            for group, model in ((staged, c.sha256), (running, None)):  # running: benchmark as is
                if not group:
                    continue
                params = fleet_bench.command_params(st.runs, st.warmup, pipeline=True,
                                                    frame_size=st.frame_size, threads=st.threads,
                                                    model=model)
                params["samples"] = False
                report = fleet_bench.run(client, params, devices=group, timeout=timeout)
                for dev in group:
                    entry = report["devices"][dev]
                    if entry["status"] != "done":
                        raise SweepError(f"{dev}: benchmark of {c.label} {entry['status']}"
                                         f"{': ' + entry['reason'] if entry.get('reason') else ''}")
                    got = (entry["result"].get("model") or {}).get("sha256")
                    if got != c.sha256:
                        raise SweepError(f"{dev}: benchmarked {str(got)[:12]}, not {c.label}")
                    c.latency[dev] = _p50s(entry["result"])
                    cache.put(f"bench:{c.sha256}:device:{dev}:{_bench_settings_key(st)}",
                              c.latency[dev])
        finally:
            remove = [d for d in staged if c.sha256 not in before.get(d, set())]
            if remove and not keep:
                answers = {}
                for dev in remove:
                    answers.update(client.request("models", {"remove": c.sha256}, devices=[dev],
                                                  timeout=30))
                failed = [f"{d}: {a.reason}" for d, a in answers.items() if not a.ok]
                if failed:
                    log(f"warning: {c.label} not removed from {'; '.join(failed)}")


def _store_shas(answers: Dict[str, Any], when: str) -> Dict[str, set]:
    out = {}
    for dev, answer in answers.items():
        if not answer.ok:
            raise SweepError(f"{dev}: listing its model store {when} failed: {answer.status}"
                             f"{': ' + answer.reason if answer.reason else ''}")
        out[dev] = {m["sha256"] for m in answer.final.get("models", [])}
    return out


# ------------------------------------------------------------------------------------- choosing


def limit_ms(target_fps: Optional[float], max_latency_ms: Optional[float]) -> Optional[float]:
    limits = []
    if target_fps is not None:
        if target_fps <= 0:
            raise ConfigError(f"--target-fps must be > 0, not {target_fps}")
        limits.append(1000.0 / target_fps)
    if max_latency_ms is not None:
        if max_latency_ms <= 0:
            raise ConfigError(f"--max-latency-ms must be > 0, not {max_latency_ms}")
        limits.append(max_latency_ms)
    return min(limits) if limits else None


def pick(cands: Sequence[Candidate], limit: float, metric: str
         ) -> Tuple[Optional[Candidate], Optional[Candidate]]:
    """(most accurate candidate whose worst p50 meets ``limit``, fastest candidate)."""
    timed = [(c, c.worst(metric)[0]) for c in cands]
    timed = [(c, w) for c, w in timed if w is not None and c.miou is not None]
    if not timed:
        return None, None
    fastest = min(timed, key=lambda cw: cw[1])[0]
    meeting = [(c, w) for c, w in timed if w <= limit]
    if not meeting:
        return None, fastest
    best = max(meeting, key=lambda cw: (round(cw[0].miou, 6), -cw[1]))[0]
    return best, fastest


def target_text(target_fps: Optional[float], max_latency_ms: Optional[float], limit: float) -> str:
    parts = []
    if target_fps is not None:
        parts.append(f"{target_fps:g} fps")
    if max_latency_ms is not None:
        parts.append(f"{max_latency_ms:g} ms")
    return f"{' and '.join(parts)} (p50 <= {limit:.1f} ms)"


def pareto(cands: Sequence[Candidate], metric: str) -> List[Candidate]:
    """Candidates no other one beats on both accuracy and worst p50 (fastest first)."""
    timed = sorted([c for c in cands if c.worst(metric)[0] is not None and c.miou is not None],
                   key=lambda c: (c.worst(metric)[0], -c.miou))
    front, best = [], -1.0
    for c in timed:
        if c.miou > best:
            front.append(c)
            best = c.miou
    return front


# ------------------------------------------------------------------------------------- output


def targets_of(cands: Sequence[Candidate]) -> List[str]:
    return sorted({t for c in cands for t in c.latency})


def rows(cands: Sequence[Candidate], metric: str, data: Data) -> List[Dict[str, Any]]:
    front = {id(c) for c in pareto(cands, metric)}
    out = []
    for c in cands:
        worst, where = c.worst(metric)
        row: Dict[str, Any] = {
            "candidate": c.label, "source": c.source.path.name,
            "depth_multiplier": c.source.depth_multiplier, "input_size": c.size, "scheme": c.scheme,
            "size_mb": round(c.size_bytes / 1e6, 3) if c.size_bytes else None,
            "sha256": c.sha256,
            "miou_pct": None if c.miou is None else round(100 * c.miou, 2),
            "pixel_acc_pct": None if c.pixel_acc is None else round(100 * c.pixel_acc, 2),
            "eval_images": len(data.eval_samples), "calib_images": len(data.calib_images),
            f"worst_p50_{metric}_ms": worst, "worst_target": where,
            "pareto": id(c) in front,
        }
        for target in targets_of(cands):
            lat = c.latency.get(target, {})
            row[f"{target}_p50_invoke_ms"] = lat.get("p50_invoke_ms")
            row[f"{target}_p50_end_to_end_ms"] = lat.get("p50_end_to_end_ms")
        out.append(row)
    return out


def write_csv(table: List[Dict[str, Any]], path: Path) -> None:
    import csv

    with open(path, "w", newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(table[0]))
        writer.writeheader()
        for r in table:
            writer.writerow({k: "" if v is None else v for k, v in r.items()})


def markdown(table: List[Dict[str, Any]], metric: str, targets: Sequence[str]) -> str:
    cols = ["candidate", "size_mb", "miou_pct"]
    for t in targets:
        cols += [f"{t}_p50_invoke_ms", f"{t}_p50_end_to_end_ms"]
    cols.append("pareto")
    titles = {"candidate": "candidate", "size_mb": "size (MB)", "miou_pct": "mIoU (%)",
              "pareto": "Pareto"}
    for t in targets:
        titles[f"{t}_p50_invoke_ms"] = f"{t} invoke p50 (ms)"
        titles[f"{t}_p50_end_to_end_ms"] = f"{t} end-to-end p50 (ms)"
    lines = ["| " + " | ".join(titles[c] for c in cols) + " |",
             "| --- |" + " ---: |" * (len(cols) - 2) + " :---: |"]

    def fmt(value: Any) -> str:
        if value is None:
            return "-"
        if isinstance(value, bool):
            return "*" if value else ""
        if isinstance(value, float):
            return f"{value:.2f}"
        return str(value)
    for r in table:
        lines.append("| " + " | ".join(fmt(r[c]) for c in cols) + " |")
    return "\n".join(lines)


def plot(cands: Sequence[Candidate], metric: str, path: Path, data: Data,
         limit: Optional[float] = None, chosen: Optional[Candidate] = None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    targets = targets_of(cands)
    markers = "osD^v<>ph*"
    fig, ax = plt.subplots(figsize=(8, 5.5))
    try:
        for i, target in enumerate(targets):
            pts = [(c.latency[target].get(f"p50_{metric}_ms"), 100 * c.miou, c) for c in cands
                   if target in c.latency and c.latency[target].get(f"p50_{metric}_ms") is not None
                   and c.miou is not None]
            if not pts:
                continue
            ax.scatter([p[0] for p in pts], [p[1] for p in pts], marker=markers[i % len(markers)],
                       label=target, alpha=0.8)
            for x, y, c in pts:
                ax.annotate(f"{c.size} {c.scheme}", (x, y), textcoords="offset points",
                            xytext=(4, 3), fontsize=7)
        front = pareto(cands, metric)
        if len(front) > 1:
            ax.plot([c.worst(metric)[0] for c in front], [100 * c.miou for c in front], "k--",
                    linewidth=0.8, label="Pareto front (worst target)")
        if limit is not None:
            ax.axvline(limit, color="r", linewidth=0.8, label=f"limit {limit:.1f} ms")
        if chosen is not None:
            ax.scatter([chosen.worst(metric)[0]], [100 * chosen.miou], s=160, facecolors="none",
                       edgecolors="r", label=f"pick: {chosen.label}")
        ax.set_xlabel(f"p50 {LATENCY_METRICS[metric]} latency per frame (ms)")
        ax.set_ylabel(f"mIoU on {len(data.eval_samples)} held-out images (%)")
        ax.set_title("DeepLab candidates: accuracy vs latency", fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower right")
        fig.tight_layout()
        fig.savefig(path, format="png", dpi=110)
    finally:
        plt.close(fig)


def report_doc(cands: Sequence[Candidate], table: List[Dict[str, Any]], data: Data,
               st: Settings, devices: Sequence[str], chosen: Optional[Candidate],
               limit: Optional[float]) -> Dict[str, Any]:
    return {
        "schema": "edge-agent/host-sweep/1",
        "split": data.split,
        "eval_images": [s.id for s in data.eval_samples],
        "calib_images": [p.name for p in data.calib_images],
        "metric": st.metric,
        "benchmark": {"where": list(devices) or [LOCAL], "runs": st.runs, "warmup": st.warmup,
                      "threads": st.threads, "frame_size": "%dx%d" % st.frame_size,
                      "pipeline": True},
        "limit_ms": limit,
        "pick": chosen.label if chosen else None,
        "candidates": table,
        "latency": {c.label: c.latency for c in cands},
    }


# ------------------------------------------------------------------------------------- the command


def _set_tf_threads(n: int) -> None:
    """Few TensorFlow threads (the machine is shared); too late once TF ran something: ignored."""
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:
        pass


def run(args: Any, out: Any = None, err: Any = None) -> int:
    """``host sweep``: build, evaluate, benchmark, write the table and the plot, pick, deploy."""
    import sys

    out = out or sys.stdout
    err = err or sys.stderr
    log: Log = lambda text: print(text, file=err, flush=True)  # noqa: E731
    limit = limit_ms(args.target_fps, args.max_latency_ms)
    if args.deploy and not args.device:
        raise ConfigError("--deploy sends the pick to the devices named with --device")
    if args.deploy and limit is None:
        raise ConfigError("--deploy needs a target to pick by: --target-fps or --max-latency-ms")
    if args.latency not in LATENCY_METRICS:
        raise ConfigError(f"--latency: choose {', '.join(LATENCY_METRICS)}")
    labels = None
    if args.labels:
        from edge_agent.inference.labels import read_labels

        labels = read_labels(args.labels)
    sign_key = None
    if args.sign_key:
        from edge_agent.models import signing

        sign_key = signing.load_private_key(args.sign_key)
    from edge_agent.output.benchmark import parse_frame_size

    st = Settings(out=Path(args.out), num_calib=args.num_calib, threads=args.threads,
                  runs=args.runs, warmup=args.warmup, metric=args.latency,
                  frame_size=parse_frame_size(args.frame_size), qat_voc=args.qat_voc,
                  qat_split=args.qat_split, qat_steps=args.qat_steps, labels=labels)
    sources = [read_source(s) for s in args.sources]
    cands = candidates(sources, args.sizes, args.schemes)
    data = load_data(args.voc, args.split, args.pairs, args.calib, args.num_calib)
    st.eval_images = {sha256_file(s.image): s.id for s in data.eval_samples}
    st.out.mkdir(parents=True, exist_ok=True)
    _set_tf_threads(args.tf_threads)
    log(f"sweep: {len(cands)} candidates ({len(sources)} source(s) x {len(args.sizes)} sizes x "
        f"{len(args.schemes)} schemes); {data.split}")
    cache = Cache(st.out)
    build(cands, data, cache, st, log)
    evaluate(cands, data, cache, st, log)
    client = None
    try:
        if args.device:
            from edge_agent.cli.remote import mqtt_from_args
            from edge_agent.fleet.client import FleetClient

            client = FleetClient(mqtt_from_args(args)).connect()
            devices = client.discover(args.discover_s)
            log(f"discovery: {client.discovery}")
            absent = [d for d in args.device if d not in devices or not devices[d].online]
            if absent:
                raise SweepError(f"device(s) not online under {client.prefix}/: "
                                 f"{', '.join(absent)} ({client.discovery})")
            bench_devices(cands, args.device, client, cache, st, log, sign_key=sign_key,
                          keep=args.keep, timeout=args.timeout)
        else:
            bench_local(cands, cache, st, log)
        chosen, fastest = pick(cands, limit, st.metric) if limit is not None else (None, None)
        table = rows(cands, st.metric, data)
        write_csv(table, st.out / "sweep.csv")
        (st.out / "sweep.json").write_text(json.dumps(
            report_doc(cands, table, data, st, args.device or [], chosen, limit), indent=1) + "\n",
            encoding="utf-8")
        plot(cands, st.metric, st.out / "pareto.png", data, limit, chosen)
        print(markdown(table, st.metric, targets_of(cands)), file=out)
        print(f"\n{data.split}", file=out)
        print(f"wrote {st.out / 'sweep.csv'}, {st.out / 'sweep.json'}, {st.out / 'pareto.png'}",
              file=out)
        if limit is None:
            return 0
        where = ", ".join(args.device) if args.device else "this machine"
        if chosen is None:
            if fastest is None:
                raise SweepError("no candidate has both an accuracy and a latency figure")
            worst, target = fastest.worst(st.metric)
            print(f"error: no candidate meets {target_text(args.target_fps, args.max_latency_ms, limit)}"
                  f" on {where}: the fastest, {fastest.label}, takes {worst:.1f} ms p50 "
                  f"{LATENCY_METRICS[st.metric]} on {target} ({1000 / worst:.1f} fps)", file=err)
            return 2
        worst, target = chosen.worst(st.metric)
        print(f"pick: {chosen.label} ({chosen.file}): mIoU {100 * chosen.miou:.2f} %, "
              f"p50 {LATENCY_METRICS[st.metric]} {worst:.1f} ms on {target} (worst of {where}) "
              f"meets {target_text(args.target_fps, args.max_latency_ms, limit)}; sha256 "
              f"{chosen.sha256[:12]}", file=out)
        if args.deploy:
            return _deploy(client, chosen, args, st, sign_key, out)
        return 0
    finally:
        if client is not None:
            client.close()


def _deploy(client: Any, chosen: Candidate, args: Any, st: Settings, sign_key: Any, out: Any) -> int:
    from edge_agent.fleet.deploy import deploy, deploy_params, report_deploy_answers

    data = chosen.file.read_bytes()
    params = deploy_params(data, args.deploy_name or f"sweep-{chosen.label}", labels=st.labels,
                           sign_key=sign_key)
    answers = deploy(client, params, data, devices=args.device, timeout=args.timeout)
    return report_deploy_answers(answers, out)
