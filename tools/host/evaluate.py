"""Compare ``.tflite`` models on a VOC-layout folder: mIoU, pixel accuracy, agreement, size, speed.

Every model runs through the agent's own ``edge_agent.inference.segmenter.Segmenter`` (same runtime
registry, letterbox, input quantization and postprocessing as on the device), so the numbers are
the ones the device would get. Writes ``results.md``, ``results.csv`` and, per image and model,
a PNG overlay of where it disagrees with the first (reference) model.
"""

from __future__ import annotations

import csv
import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import cv2
import numpy as np
from tqdm import tqdm

from edge_agent.errors import ConfigError
from edge_agent.inference.labels import read_labels
from edge_agent.inference.segmenter import Segmenter

from . import metrics
from .datasets import VocDataset, read_rgb

WARMUP_RUNS = 1


@dataclass
class ModelResult:
    name: str
    path: Path
    size_bytes: int
    runtime: str = ""
    latencies_ms: List[float] = field(default_factory=list)
    masks: Dict[str, np.ndarray] = field(default_factory=dict)
    conf: Optional[np.ndarray] = None
    extra_masks: Dict[str, np.ndarray] = field(default_factory=dict)  # unlabelled images

    @property
    def latency_ms(self) -> float:
        return float(np.median(self.latencies_ms)) if self.latencies_ms else float("nan")


@dataclass
class Report:
    results: List[ModelResult]
    labels: List[str]
    agreement: Dict[tuple, float]
    images: int
    # per unlabelled image (``--image``, e.g. the golden bird): pairwise agreement
    extra_agreement: Dict[str, Dict[tuple, float]] = field(default_factory=dict)

    def present(self) -> List[int]:
        total = sum(r.conf for r in self.results)
        return metrics.present_classes(total)


def _unique_names(paths: Sequence[Path]) -> List[str]:
    names = [p.stem for p in paths]
    return [f"{n}#{i}" if names.count(n) > 1 else n for i, n in enumerate(names)]


def evaluate(models: Sequence["str | Path"], voc_root: "str | Path", split: str = "val",
             labels: Optional[str] = None, runtime: str = "auto", threads: Optional[int] = None,
             num_classes: Optional[int] = None, images: Sequence["str | Path"] = ()) -> Report:
    """Run every model on every sample (and on the unlabelled ``images``, for agreement only);
    ConfigError/ModelError/DatasetError on bad input."""
    if not models:
        raise ConfigError("evaluate needs at least one .tflite model")
    paths = [Path(m) for m in models]
    dataset = VocDataset(voc_root, split)
    names = read_labels(labels) if labels else [str(i) for i in range(num_classes or 21)]
    extra = {Path(p).stem: read_rgb(p) for p in images}
    n = len(names)
    results = []
    for name, path in zip(_unique_names(paths), paths):
        seg = Segmenter(str(path), runtime=runtime, threads=threads)
        if seg.model.output.kind == "binary":  # its class 1 is not VOC's class 1: never a wrong score
            raise ConfigError(f"{path}: a background/foreground model; evaluate scores {n}-class label maps")
        res = ModelResult(name, path, path.stat().st_size, seg.describe_runtime(),
                          conf=np.zeros((n, n), np.int64))
        for sample, image, label in tqdm(dataset, total=len(dataset), desc=name, unit="img",
                                         leave=False):
            for _ in range(WARMUP_RUNS if not res.latencies_ms else 0):
                seg.segment(image)
            out = seg.segment(image)
            res.latencies_ms.append(out.timings["inference"])
            res.masks[sample.id] = out.mask
            res.conf += metrics.confusion(out.mask, label, n)
        res.extra_masks = {k: seg.segment(image).mask for k, image in extra.items()}
        results.append(res)
    agree = {}
    extra_agree: Dict[str, Dict[tuple, float]] = {k: {} for k in extra}
    for a, b in itertools.combinations(results, 2):
        values = [metrics.agreement(a.masks[k], b.masks[k]) for k in a.masks]
        agree[(a.name, b.name)] = float(np.mean(values))
        for k in extra:
            extra_agree[k][(a.name, b.name)] = metrics.agreement(a.extra_masks[k],
                                                                 b.extra_masks[k])
    return Report(results, names, agree, len(dataset), extra_agree)


def _fmt(value: float, pct: bool = True) -> str:
    if value != value:  # NaN
        return "-"
    return f"{100 * value:.2f}" if pct else f"{value:.1f}"


def markdown(report: Report) -> str:
    """Three tables: summary per model, IoU per class present, pairwise agreement."""
    present = report.present()
    out = [f"Evaluated on {report.images} images; mIoU = mean IoU over the {len(present)} "
           f"classes present in the labels (255 ignored); latency = median invoke.", "",
           "| model | size (MB) | invoke (ms) | mIoU (%) | pixel acc (%) | runtime |",
           "| --- | ---: | ---: | ---: | ---: | --- |"]
    for r in report.results:
        s = metrics.summarize(r.conf)
        out.append(f"| {r.name} | {r.size_bytes / 1e6:.2f} | {_fmt(r.latency_ms, False)} | "
                   f"{_fmt(s['miou'])} | {_fmt(s['pixel_acc'])} | {r.runtime} |")
    out += ["", "| class | " + " | ".join(r.name for r in report.results) + " |",
            "| --- |" + " ---: |" * len(report.results)]
    ious = [metrics.iou_per_class(r.conf) for r in report.results]
    for c in present:
        out.append(f"| {report.labels[c]} | " + " | ".join(_fmt(i[c]) for i in ious) + " |")
    if report.agreement:
        out += _agreement_table("agreement (%)", report.results, report.agreement)
    for image, values in report.extra_agreement.items():
        out += _agreement_table(f"agreement on {image} (%)", report.results, values)
    return "\n".join(out) + "\n"


def _agreement_table(title: str, results: Sequence[ModelResult],
                     values: Dict[tuple, float]) -> List[str]:
    out = ["", f"| {title} | " + " | ".join(r.name for r in results) + " |",
           "| --- |" + " ---: |" * len(results)]
    for a in results:
        cells = [_fmt(1.0 if a is b else values.get((a.name, b.name), values.get((b.name, a.name))))
                 for b in results]
        out.append(f"| {a.name} | " + " | ".join(cells) + " |")
    return out


def csv_rows(report: Report) -> List[List[str]]:
    """Long format: model, metric, class, value (easy to pivot or plot)."""
    rows = [["model", "metric", "class", "value"]]
    for r in report.results:
        s = metrics.summarize(r.conf)
        rows += [[r.name, "size_bytes", "", str(r.size_bytes)],
                 [r.name, "latency_ms", "", f"{r.latency_ms:.3f}"],
                 [r.name, "miou", "", f"{s['miou']:.6f}"],
                 [r.name, "pixel_acc", "", f"{s['pixel_acc']:.6f}"]]
        ious = metrics.iou_per_class(r.conf)
        rows += [[r.name, "iou", report.labels[c], f"{ious[c]:.6f}"] for c in report.present()]
    rows += [[f"{a}|{b}", "agreement", "", f"{v:.6f}"] for (a, b), v in report.agreement.items()]
    rows += [[f"{a}|{b}", "image_agreement", image, f"{v:.6f}"]
             for image, values in report.extra_agreement.items() for (a, b), v in values.items()]
    return rows


def disagreement_overlay(image: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Dimmed image, disagreeing pixels in magenta (RGB)."""
    out = (image.astype(np.float32) * 0.4).astype(np.uint8)
    out[a != b] = (255, 0, 255)
    return out


def write_report(report: Report, out_dir: "str | Path", voc_root: "str | Path",
                 split: str = "val", overlays: bool = True) -> List[Path]:
    """results.md, results.csv and overlays/<image>__<ref>__vs__<model>.png; returns paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "results.md"
    md.write_text(markdown(report))
    csv_path = out_dir / "results.csv"
    with csv_path.open("w", newline="") as fh:
        csv.writer(fh).writerows(csv_rows(report))
    written = [md, csv_path]
    if overlays and len(report.results) > 1:
        ref = report.results[0]
        (out_dir / "overlays").mkdir(exist_ok=True)
        for sample, image, _ in VocDataset(voc_root, split):
            for other in report.results[1:]:
                png = out_dir / "overlays" / f"{sample.id}__{ref.name}__vs__{other.name}.png"
                rgb = disagreement_overlay(image, ref.masks[sample.id], other.masks[sample.id])
                cv2.imwrite(str(png), cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
                written.append(png)
    return written

