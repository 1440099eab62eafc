"""Will this ``.tflite`` map to the Edge TPU? Op/dtype analysis, plus ``edgetpu_compiler`` if present.

The analysis needs no Coral tooling: it lists ops and tensor dtypes and flags what the Edge TPU
compiler leaves on the CPU (float ops, ops it does not support such as SPACE_TO_BATCH_ND,
dynamic shapes). When ``edgetpu_compiler`` is on PATH it is run too; otherwise that step says so
and is skipped (it only exists for x86-64 Debian/Ubuntu).
"""

from __future__ import annotations

import shutil
import subprocess
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import numpy as np

from .tflite_reader import TFLiteGraph, read_tflite

# Ops the Edge TPU compiler can map (coral.ai "TensorFlow models on the Edge TPU", supported ops).
EDGETPU_OPS = frozenset("""
ADD AVERAGE_POOL_2D CONCATENATION CONV_2D DEPTHWISE_CONV_2D DEQUANTIZE EXP FULLY_CONNECTED
GATHER HARD_SWISH L2_NORMALIZATION LOGISTIC LSTM MAX_POOL_2D MAXIMUM MEAN MINIMUM MUL PACK PAD
PRELU QUANTIZE REDUCE_MAX REDUCE_MIN RELU RELU6 RELU_N1_TO_1 RESHAPE RESIZE_BILINEAR
RESIZE_NEAREST_NEIGHBOR RSQRT SLICE SOFTMAX SPACE_TO_DEPTH SPLIT SQUARED_DIFFERENCE SQUEEZE
STRIDED_SLICE SUB SUM TANH TRANSPOSE TRANSPOSE_CONV
""".split())
# Allowed at the graph's end: the compiler stops mapping there and the CPU finishes (cheap).
CPU_TAIL_OPS = frozenset({"ARG_MAX"})
FLOAT_TYPES = (np.float32, np.float16, np.float64)
COMPILER = "edgetpu_compiler"


@dataclass
class Finding:
    severity: str  # "error" (op leaves the Edge TPU) or "warning"
    op_index: Optional[int]
    message: str

    def __str__(self) -> str:
        where = f"op {self.op_index}: " if self.op_index is not None else ""
        return f"{self.severity}: {where}{self.message}"


@dataclass
class CheckReport:
    path: Path
    op_counts: Counter
    dtype_counts: Counter
    findings: List[Finding] = field(default_factory=list)
    compiler: str = ""

    @property
    def errors(self) -> List[Finding]:
        return [f for f in self.findings if f.severity == "error"]

    def text(self) -> str:
        ops = ", ".join(f"{k} x{v}" for k, v in sorted(self.op_counts.items()))
        dtypes = ", ".join(f"{k} x{v}" for k, v in sorted(self.dtype_counts.items()))
        lines = [f"{self.path.name}: {sum(self.op_counts.values())} ops: {ops}",
                 f"activation tensor dtypes: {dtypes}"]
        lines += [str(f) for f in self.findings] or ["no problems found: every op can map"]
        verdict = ("maps fully to the Edge TPU" if not self.errors else
                   f"{len(self.errors)} op(s) would run on the CPU")
        lines.append(f"verdict: {verdict}")
        if self.compiler:
            lines.append(self.compiler)
        return "\n".join(lines)


def _activation_dtypes(graph: TFLiteGraph, op) -> List[type]:
    return [graph.tensors[i].dtype for i in list(op.inputs) + list(op.outputs)
            if i >= 0 and graph.tensors[i].data is None]


def analyze_graph(graph: TFLiteGraph) -> CheckReport:
    """Findings for every op; ``error`` = the compiler would leave it (and what follows) on CPU."""
    report = CheckReport(graph.path, Counter(op.opcode for op in graph.ops), Counter())
    for t in graph.tensors:
        if t.data is None:
            report.dtype_counts[np.dtype(t.dtype).name] += 1
    last = len(graph.ops) - 1
    for op in graph.ops:
        name = op.opcode if op.opcode != "CUSTOM" else f"CUSTOM({op.custom_code})"
        if op.opcode == "CUSTOM" and op.custom_code == "edgetpu-custom-op":
            report.findings.append(Finding("warning", op.index, "already compiled for the Edge TPU"))
            continue
        if op.opcode in CPU_TAIL_OPS:
            if op.index != last:
                report.findings.append(Finding("error", op.index, f"{name} is not supported "
                                               "and is not at the end of the graph"))
            continue
        if op.opcode not in EDGETPU_OPS:
            report.findings.append(Finding("error", op.index, f"{name} is not supported by the "
                                           "Edge TPU"))
        elif any(d in FLOAT_TYPES for d in _activation_dtypes(graph, op)) and \
                op.opcode not in ("QUANTIZE", "DEQUANTIZE"):
            report.findings.append(Finding("error", op.index, f"{name} has float activations "
                                           "(quantize fully: int8 mode)"))
        elif op.opcode == "DEQUANTIZE" and graph.tensors[op.inputs[0]].data is not None:
            report.findings.append(Finding("error", op.index, "DEQUANTIZE of weights "
                                           "(float16/dynamic-range model)"))
    per_channel = [op.index for op in graph.ops
                   if op.opcode in ("CONV_2D", "DEPTHWISE_CONV_2D") and len(op.inputs) > 1
                   and graph.tensors[op.inputs[1]].per_axis]
    if per_channel:
        report.findings.append(Finding("warning", None, f"{len(per_channel)} conv ops have "
                                       "per-channel weights: older edgetpu_compiler versions "
                                       "need per-tensor (ptq --per-tensor)"))
    for idx in graph.inputs + graph.outputs:
        t = graph.tensors[idx]
        if any(d < 0 for d in t.shape_signature):
            report.findings.append(Finding("error", None, f"dynamic shape {t.shape_signature} "
                                           f"on {t.name!r}: the Edge TPU needs static shapes"))
    return report


def run_compiler(path: Path, out_dir: Optional[Path] = None, timeout: float = 600) -> str:
    """Compile with ``edgetpu_compiler`` when installed; a one-line 'skipped' otherwise."""
    exe = shutil.which(COMPILER)
    if exe is None:
        return (f"{COMPILER}: not installed (x86-64 Debian/Ubuntu only, from Coral's apt "
                f"repository): compile step skipped")
    out_dir = Path(out_dir or path.parent)
    proc = subprocess.run([exe, "-s", "-o", str(out_dir), str(path)], capture_output=True,
                          text=True, timeout=timeout, check=False)
    tail = (proc.stdout + proc.stderr).strip()
    return f"{COMPILER} exit {proc.returncode}:\n{tail}"


def check(path: "str | Path", compile_model: bool = True,
          out_dir: Optional[Path] = None) -> CheckReport:
    graph = read_tflite(path)
    report = analyze_graph(graph)
    if compile_model:
        report.compiler = run_compiler(Path(path), out_dir)
    return report
