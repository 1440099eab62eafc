"""``edge-agent inspect MODEL``: tensors, dtypes, shapes, quantization and ops of a .tflite, and
how the agent would read it (normalisation and where it came from, the output, class names).

Works on any model the runtime can parse, including Edge TPU builds (tensors are read without
allocating, so the custom op does not need to resolve).
"""

from __future__ import annotations

from collections import Counter
from typing import Any, Dict, List, Optional

import numpy as np

from edge_agent.errors import ModelError
from edge_agent.inference import runtimes
from edge_agent.inference.labels import labels_for
from edge_agent.inference.contract import ModelOptions, read_contract
from edge_agent.inference.modelfile import read_model_file
from edge_agent.inference.preprocess import Normalization


def describe(model_path: str, runtime: str = "auto", options: Optional[ModelOptions] = None,
             labels: Optional[str] = None) -> Dict[str, Any]:
    mf = read_model_file(model_path)
    loaded = runtimes.create_interpreter(model_path, runtime, threads=1, allocate=False)
    it = loaded.interpreter
    try:
        ops = [op["op_name"] for op in it._get_ops_details()]  # stable since TF 2.5
    except Exception:  # pragma: no cover - very old runtimes
        ops = []
    try:
        segmentation: Dict[str, Any] = read_contract(it, mf, options or ModelOptions(), labels_for(labels)).describe()
    except ModelError as exc:
        segmentation = {"refused": str(exc)}
    return {
        "path": model_path,
        "sha256": mf.sha256,
        "size_bytes": mf.size,
        "edgetpu": mf.edgetpu,
        "runtime": f"{loaded.runtime} {loaded.runtime_version}",
        "inputs": [tensor_summary(d) for d in it.get_input_details()],
        "outputs": [tensor_summary(d) for d in it.get_output_details()],
        "tensors": [tensor_summary(d) for d in it.get_tensor_details()],
        "ops": ops,
        "segmentation": segmentation,
    }


def tensor_summary(d: Dict[str, Any]) -> Dict[str, Any]:
    """One entry of a runtime's ``get_*_details()`` as JSON: index, name, dtype, shape and its
    quantization (scale/zero point, or a per-axis summary: dimension, channels, scale range)."""
    qp = d.get("quantization_parameters") or {}
    scales = np.asarray(qp.get("scales", []), dtype=np.float64)
    zero_points = np.asarray(qp.get("zero_points", []), dtype=np.int64)
    out = {
        "index": int(d["index"]),
        "name": d["name"],
        "dtype": np.dtype(d["dtype"]).name,
        "shape": [int(s) for s in d["shape"]],
    }
    if scales.size == 1:
        out["quantization"] = {"scale": float(scales[0]), "zero_point": int(zero_points[0])}
    elif scales.size > 1:
        out["quantization"] = {
            "per_axis": True,
            "quantized_dimension": int(qp.get("quantized_dimension", 0)),
            "channels": int(scales.size),
            "scale_min": float(scales.min()),
            "scale_max": float(scales.max()),
            "zero_points": sorted({int(z) for z in zero_points}),
        }
    return out


def format_report(info: Dict[str, Any], all_tensors: bool = False) -> str:
    lines: List[str] = [
        f"model    {info['path']}",
        f"sha256   {info['sha256']}",
        f"size     {info['size_bytes']} bytes{'  (Edge TPU build: contains edgetpu-custom-op)' if info['edgetpu'] else ''}",
        f"runtime  {info['runtime']}",
    ]
    for title, key in (("inputs", "inputs"), ("outputs", "outputs")):
        lines.append(f"{title}:")
        lines.extend("  " + _tensor_line(t) for t in info[key])
    counts = Counter(info["ops"])
    lines.append(f"ops ({len(info['ops'])}): " + ", ".join(f"{op} x{n}" for op, n in counts.most_common()))
    if all_tensors:
        lines.append(f"tensors ({len(info['tensors'])}):")
        lines.extend("  " + _tensor_line(t) for t in info["tensors"])
    lines.extend(segmentation_lines(info["segmentation"]))
    return "\n".join(lines)


def segmentation_lines(seg: Dict[str, Any]) -> List[str]:
    """How the agent reads the model: normalisation and its source, output, classes, metadata."""
    if "refused" in seg:
        return [f"segmentation: refused: {seg['refused']}"]
    norm, out, md = seg["normalization"], seg["output"], seg["metadata"]
    lines = [f"normalisation  {Normalization.of(norm['mean'], norm['std'], norm['source']).describe()}",
             f"output   '{out['name']}': {out['reason']}"]
    names = seg["labels"]
    classes = seg["classes"]
    lines.append(f"classes  {classes if classes is not None else 'unknown'}"
                 + (f": {', '.join(names)}" if names else " (no label names: pass --labels)"))
    if md and "problem" in md:
        lines.append(f"metadata {md['problem']}")
    elif md:
        lines.append(f"metadata {md['name']} {md['version']}".rstrip() + (f"; files {', '.join(md['files'])}" if md["files"] else ""))
    else:
        lines.append("metadata none (TFLite Metadata absent: settings and defaults apply)")
    return lines


def _tensor_line(t: Dict[str, Any]) -> str:
    q = t.get("quantization")
    if not q:
        quant = "not quantized"
    elif q.get("per_axis"):
        quant = (f"per-axis dim {q['quantized_dimension']} ({q['channels']} ch) "
                 f"scale {q['scale_min']:.3g}..{q['scale_max']:.3g} zp {q['zero_points'][:4]}")
    else:
        quant = f"scale {q['scale']:.6g} zero_point {q['zero_point']}"
    return f"[{t['index']:3d}] {t['name']:60s} {t['dtype']:8s} {str(t['shape']):18s} {quant}"
