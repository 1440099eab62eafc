"""The model contract: how to feed and read a TFLite segmentation model, read from the model itself.

What the user may say where the model is silent (:class:`ModelOptions`, the ``[model]`` keys of
the same names), the input's spec and normalisation, which output is the segmentation and how to
read it (class ids, score maps in NHWC/NCHW, single-channel probability or logit maps), and the
class names. Anything that stays ambiguous is refused in one line naming the setting that resolves
it (README "Bring your own model"). :mod:`edge_agent.inference.model` runs the model.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from edge_agent.config import ModelConfig
from edge_agent.errors import ModelError
from edge_agent.inference.metadata import ModelMetadata, TensorMeta
from edge_agent.inference.preprocess import DEEPLAB, PRESETS, Normalization
from edge_agent.inference.modelfile import ModelFile

log = logging.getLogger("edge_agent.inference.model")  # the contract logs as the model always did

_SUPPORTED_INPUT = (np.uint8, np.int8, np.float32)


@dataclass(frozen=True)
class ModelOptions:
    """What the user says about a model that the model itself may not (config ``[model]`` / CLI).

    Every field's default means "from the model": these settings only resolve what the model's
    metadata and tensors leave open; docs in README "Bring your own model".
    """

    normalization: str = ModelConfig.normalization  # "" | "-1..1" | "0..1" | "raw"
    input_mean: str = ModelConfig.input_mean  # "127.5" or "123.7,116.3,103.5" (R, G, B)
    input_std: str = ModelConfig.input_std
    output_layout: str = ModelConfig.output_layout  # "auto" | "nhwc" | "nchw"
    output: str = ModelConfig.output  # output tensor name (or index) when the model has several
    output_scores: str = ModelConfig.output_scores  # single-channel maps: "auto" | "probability" | "logit"
    threshold: float = ModelConfig.threshold  # single-channel maps: foreground when probability > threshold

    @classmethod
    def from_config(cls, m: ModelConfig) -> "ModelOptions":
        """From the config's ``[model]`` section (the CLI's flags of the same names build a
        ``ModelConfig`` first: ``edge_agent.cli.segment.model_options``)."""
        return cls(**{f: getattr(m, f) for f in cls.__dataclass_fields__ if getattr(m, f, None) is not None})

    def configured(self, where: str) -> Optional[Normalization]:
        """The normalisation the settings ask for, or None when they leave it to the model."""
        if self.normalization and (self.input_mean or self.input_std):
            raise ModelError(f"{where}: set either model.normalization or model.input_mean/model.input_std, not both")
        if self.normalization:
            if self.normalization not in PRESETS:
                raise ModelError(f"{where}: model.normalization '{self.normalization}' is not one of "
                                 f"{', '.join(PRESETS)}")
            mean, std = PRESETS[self.normalization]
            return Normalization.of(mean, std, f"setting model.normalization = '{self.normalization}'")
        if not (self.input_mean or self.input_std):
            return None
        if not (self.input_mean and self.input_std):
            raise ModelError(f"{where}: model.input_mean and model.input_std go together: set both")
        try:
            mean = [float(v) for v in self.input_mean.split(",")]
            std = [float(v) for v in self.input_std.split(",")]
            return Normalization.of(mean, std, "settings model.input_mean/model.input_std")
        except ValueError as exc:
            raise ModelError(f"{where}: model.input_mean/model.input_std: {exc} "
                             f"(one number, or three for R, G, B, comma-separated)") from None


@dataclass(frozen=True)
class InputSpec:
    index: int
    height: int
    width: int
    dtype: Any
    scale: float
    zero_point: int


@dataclass(frozen=True)
class OutputSpec:
    index: int
    kind: str  # "labels" (ArgMax in the graph), "logits" (C score maps, argmax here) or "binary"
    height: int
    width: int
    classes: Optional[int]
    dtype: Any
    layout: str = "nhwc"  # where the class axis is: "nhwc" ([1, H, W, C]) or "nchw" ([1, C, H, W])
    name: str = ""
    scores: str = ""  # binary: "probability" or "logit"
    threshold: float = 0.5  # binary: foreground above this probability
    raw_threshold: float = 0.0  # the same threshold in the tensor's own (quantized/logit) units
    reason: str = ""  # why this interpretation (for info / inspect)

    def to_dict(self) -> Dict[str, Any]:
        out = {"name": self.name, "kind": self.kind, "layout": self.layout, "classes": self.classes,
               "size": [self.height, self.width], "reason": self.reason}
        if self.kind == "binary":
            out.update(scores=self.scores, threshold=self.threshold)
        return out


def _spatial(shape) -> Tuple[int, ...]:
    return tuple(int(s) for s in shape)


def read_input_spec(details: Dict[str, Any], where: str) -> InputSpec:
    shape = _spatial(details["shape"])
    if len(shape) != 4 or shape[0] != 1 or shape[3] != 3:
        raise ModelError(f"{where}: input shape {list(shape)} is not [1, H, W, 3] (an RGB image)")
    dtype = np.dtype(details["dtype"]).type
    if dtype not in _SUPPORTED_INPUT:
        raise ModelError(f"{where}: input dtype {np.dtype(dtype).name} not supported (uint8, int8, float32)")
    scale, zero_point = details.get("quantization", (0.0, 0)) or (0.0, 0)
    if dtype != np.float32 and not scale:
        raise ModelError(f"{where}: {np.dtype(dtype).name} input without quantization parameters")
    return InputSpec(details["index"], shape[1], shape[2], dtype, float(scale), int(zero_point))


NORMALIZATION_SETTINGS = "model.normalization (-1..1, 0..1, raw) or model.input_mean/model.input_std"


CALIBRATED_COVERAGE = 0.6  # the least share of a preset's range a calibrated input range fills


def resolve_normalization(spec: InputSpec, meta: Optional[TensorMeta], options: ModelOptions,
                          where: str) -> Normalization:
    """The input normalisation in force: metadata, else the settings, else the input's quantization
    range (a quantized input says which real range it was calibrated for), else the DeepLab default.

    A setting that contradicts the metadata is refused rather than silently ignored or obeyed.
    """
    configured = options.configured(where)
    if meta is not None and meta.mean and meta.std:
        try:
            found = Normalization.of(meta.mean, meta.std, "the model's metadata")
        except ValueError as exc:
            raise ModelError(f"{where}: the metadata's input normalisation is unusable ({exc}): "
                             f"fix the model's metadata") from None
        if configured is not None and not configured.same_as(found):
            raise ModelError(f"{where}: {configured.source} contradicts the model's metadata "
                             f"({found.describe()}): remove the setting")
        return found
    if configured is not None:
        return configured
    if spec.dtype == np.float32:
        return DEEPLAB
    info = np.iinfo(spec.dtype)
    lo, hi = (info.min - spec.zero_point) * spec.scale, (info.max - spec.zero_point) * spec.scale
    # A quantized input was calibrated on real data: its range lies inside the range the model was
    # trained for and fills most of it (post-training quantization rarely sees exactly -1 and 1).
    # Accepted only when exactly one preset fits that way; anything else is refused.
    tolerance = 3 * spec.scale + 0.02 * (hi - lo)
    fits = []
    for name, (mean, std) in PRESETS.items():
        rlo, rhi = Normalization.of(mean, std, "").real_range()
        inside = lo >= rlo - tolerance and hi <= rhi + tolerance
        if inside and (hi - lo) >= CALIBRATED_COVERAGE * (rhi - rlo):
            fits.append((mean, std))
    if len(fits) == 1:
        mean, std = fits[0]
        return Normalization.of(mean, std, f"the input quantization (real range {lo:.4g}..{hi:.4g})")
    raise ModelError(f"{where}: the input quantization covers {lo:.4g}..{hi:.4g}, which is none of "
                     f"-1..1, 0..1, raw, and the model has no normalisation metadata: set {NORMALIZATION_SETTINGS}")


LAYOUT_SETTING = "model.output_layout (nhwc or nchw)"


SCORES_SETTING = "model.output_scores (probability or logit)"


_SEGMENTATION_WORDS = ("segment", "mask")


def says_segmentation(md: Optional[ModelMetadata], meta: Optional[TensorMeta]) -> bool:
    """Does the model's metadata say this output is a segmentation (label file or description)?"""
    if meta is not None and meta.label_file:
        return True
    texts = [meta.name, meta.description] if meta is not None else []
    if md is not None:
        texts += [md.name, md.description]
    return any(w in t.lower() for t in texts for w in _SEGMENTATION_WORDS)


def _grid_fits(h: int, w: int, input_hw: Tuple[int, int]) -> bool:
    """An output grid of ``h x w`` that is the input's grid (same aspect ratio, at most its size)."""
    ih, iw = input_hw
    return h <= ih and w <= iw and abs(h * iw - w * ih) <= max(ih, iw)


def _quant(details: Dict[str, Any]) -> Tuple[float, int]:
    scale, zero_point = details.get("quantization", (0.0, 0)) or (0.0, 0)
    return float(scale), int(zero_point)


def read_output_spec(details: Dict[str, Any], where: str, input_hw: Optional[Tuple[int, int]] = None,
                     meta: Optional[TensorMeta] = None, options: ModelOptions = ModelOptions(),
                     label_count: Optional[int] = None, producer: str = "",
                     md: Optional[ModelMetadata] = None) -> OutputSpec:
    """Decide what one output tensor is, or refuse it in one line naming the setting that would tell.

    ``input_hw`` (the input's H, W) tells a class axis from a spatial one and spots image-to-image
    models; ``label_count`` (from a label file or the metadata) and ``meta`` disambiguate further.
    """
    shape = _spatial(details["shape"])
    dtype = np.dtype(details["dtype"]).type
    name = str(details.get("name", ""))
    where = f"{where}: output '{name}' {list(shape)}" if name else f"{where}: output {list(shape)}"
    scale, zero_point = _quant(details)
    integer = np.issubdtype(dtype, np.integer)
    ids = integer and not scale  # ArgMax output: class ids, not quantized scores
    input_hw = input_hw or (max(shape[1:], default=1),) * 2
    layout_set = options.output_layout in ("nhwc", "nchw")
    configured = layout_set or options.output_scores in ("probability", "logit")
    index = details["index"]

    def check_size(h: int, w: int) -> None:
        if (h > input_hw[0] or w > input_hw[1]) and not configured:
            raise ModelError(f"{where}: not a segmentation model: its output ({h}x{w}) is larger than its "
                             f"input ({input_hw[0]}x{input_hw[1]}), as in image-to-image models "
                             f"(if it is a segmenter, set {LAYOUT_SETTING})")

    if ids and shape[:1] == (1,) and (len(shape) == 3 or (len(shape) == 4 and shape[3] == 1)):
        check_size(shape[1], shape[2])
        return OutputSpec(index, "labels", shape[1], shape[2], label_count, dtype, "nhwc", name,
                          reason="class ids (ArgMax in the model)")
    if ids and len(shape) == 4 and shape[0] == 1 and shape[1] == 1 and options.output_layout != "nhwc":
        check_size(shape[2], shape[3])
        return OutputSpec(index, "labels", shape[2], shape[3], label_count, dtype, "nchw", name,
                          reason="class ids (ArgMax in the model), [1, 1, H, W]")
    if dtype not in (np.uint8, np.int8, np.float32, np.float16) or shape[:1] != (1,) or len(shape) not in (3, 4):
        hint = " (looks like an image classifier)" if len(shape) == 2 else ""
        raise ModelError(f"{where}: not a segmentation model: the output is neither [1, H, W] class ids "
                         f"nor [1, H, W, C] / [1, C, H, W] scores ({np.dtype(dtype).name}){hint}")

    # Single-channel maps: a probability (or logit) of one class per pixel.
    single = None
    if len(shape) == 3:
        single = (shape[1], shape[2], "nhwc")
    elif shape[3] == 1 and options.output_layout != "nchw":
        single = (shape[1], shape[2], "nhwc")
    elif shape[1] == 1 and options.output_layout != "nhwc":
        single = (shape[2], shape[3], "nchw")
    if single is not None:
        h, w, layout = single
        if len(shape) == 3 and not _grid_fits(h, w, input_hw) and not configured:
            # [1, A, B] is not read in another layout, so no layout setting can help: say what it is
            raise ModelError(f"{where}: not a segmentation model: [1, {h}, {w}] is no H x W map of the "
                             f"{input_hw[0]}x{input_hw[1]} input (a detector's anchors or landmarks?)")
        check_size(h, w)
        scores, why = options.output_scores, "set by model.output_scores"
        if scores == "auto":
            scores, why = _detect_scores(meta, producer, dtype, scale, zero_point)
        if scores == "auto":
            raise ModelError(f"{where}: a single-channel map, but nothing says whether it holds probabilities "
                             f"or logits (no sigmoid in the graph, no metadata range): set {SCORES_SETTING}")
        t = float(options.threshold)
        if not 0.0 <= t <= 1.0:
            raise ModelError(f"{where}: model.threshold {t:g} is not a probability (0..1)")
        raw = t if scores == "probability" else (math.log(t / (1 - t)) if 0 < t < 1 else math.copysign(math.inf, t - 0.5))
        if scale:  # quantized: compare the stored integers
            raw = raw / scale + zero_point
        return OutputSpec(index, "binary", h, w, 2, dtype, layout, name, scores, t, raw,
                          reason=f"single-channel {scores} map ({why}), foreground above {t:g}")

    # Several score maps: find the class axis.
    candidates = {"nhwc": (shape[1], shape[2], shape[3]), "nchw": (shape[2], shape[3], shape[1])}
    if layout_set:
        layout, reason = options.output_layout, "set by model.output_layout"
    else:
        layout, reason = _detect_layout(candidates, input_hw, meta, label_count, where)
    h, w, classes = candidates[layout]
    if classes < 2 or h < 2 or w < 2:
        raise ModelError(f"{where}: not a segmentation model as {layout.upper()} ({classes} classes of {h}x{w})")
    if classes > 256:
        raise ModelError(f"{where}: {classes} classes; at most 256 fit in an 8-bit mask")
    check_size(h, w)
    if (classes == 3 and (h, w) == tuple(input_hw) and not configured and label_count != 3
            and not says_segmentation(md, meta)):
        raise ModelError(f"{where}: not a segmentation model: 3 channels at the input's size is an image "
                         f"(image-to-image model?); if these are 3 class scores, give 3 labels or set "
                         f"{LAYOUT_SETTING}")
    return OutputSpec(index, "logits", h, w, classes, dtype, layout, name,
                      reason=f"{classes} class scores, {layout.upper()} ({reason})")


def _detect_scores(meta: Optional[TensorMeta], producer: str, dtype, scale: float,
                   zero_point: int) -> Tuple[str, str]:
    if producer == "LOGISTIC":
        return "probability", "a sigmoid (LOGISTIC) produces it"
    if meta is not None and meta.stats_min and meta.stats_max:
        if min(meta.stats_min) >= 0 and max(meta.stats_max) <= 1:
            return "probability", "the metadata's value range is 0..1"
    if scale and np.issubdtype(dtype, np.integer):
        info = np.iinfo(dtype)
        lo, hi = (info.min - zero_point) * scale, (info.max - zero_point) * scale
        if lo >= -scale and hi <= 1 + scale:
            return "probability", f"its quantization covers {lo:.3g}..{hi:.3g}"
    return "auto", ""


def _detect_layout(candidates: Dict[str, Tuple[int, int, int]], input_hw: Tuple[int, int],
                   meta: Optional[TensorMeta], label_count: Optional[int], where: str) -> Tuple[str, str]:
    names = [n.lower() for n in (meta.dimension_names if meta is not None else ())]
    if len(names) == 4:
        for layout, axis in (("nhwc", 3), ("nchw", 1)):
            if any(word in names[axis] for word in ("class", "channel", "categor")):
                return layout, f"the metadata names dimension {axis} '{names[axis]}'"
    fits = {k: v for k, v in candidates.items() if v[2] >= 2 and v[0] >= 2 and v[1] >= 2 and v[2] <= 256}
    if label_count:
        by_labels = {k: v for k, v in fits.items() if v[2] == label_count}
        if len(by_labels) == 1:
            layout = next(iter(by_labels))
            return layout, f"the class axis is the one with {label_count} entries, one per label"
    by_grid = {k: v for k, v in fits.items() if _grid_fits(v[0], v[1], input_hw)}
    if len(by_grid) == 1:
        layout = next(iter(by_grid))
        h, w = by_grid[layout][:2]
        same = (h, w) == tuple(input_hw)
        return layout, (f"only its H x W ({h}x{w}) {'is the input size' if same else 'has the aspect ratio of the input'} "
                        f"{input_hw[0]}x{input_hw[1]}")
    if len(fits) == 1 and not by_grid:
        return next(iter(fits)), "the only readable layout"
    if fits and not by_grid and all(v[0] > input_hw[0] or v[1] > input_hw[1] for v in fits.values()):
        return "nhwc", "TFLite's own layout"  # larger than the input either way: refused as image-to-image
    if not fits:
        raise ModelError(f"{where}: not a segmentation model: no axis holds 2..256 class scores")
    raise ModelError(f"{where}: ambiguous layout: could be [1, H, W, C] or [1, C, H, W]: set {LAYOUT_SETTING}")


def choose_output(outputs: Sequence[Dict[str, Any]], where: str, input_hw: Tuple[int, int],
                  md: Optional[ModelMetadata], options: ModelOptions, labels: Optional[Sequence[str]],
                  producers: Dict[int, str]) -> Tuple[OutputSpec, Optional[List[str]]]:
    """Pick the segmentation output and its class names: the one ``model.output`` names, else one
    the metadata labels, else the first that can be read (in-graph ArgMax first)."""
    metas = list(md.outputs) if md is not None else []
    order = list(range(len(outputs)))
    if options.output:
        names = [str(d.get("name", "")) for d in outputs]
        wanted = [i for i, n in enumerate(names) if n == options.output or str(i) == options.output]
        if not wanted:
            raise ModelError(f"{where}: model.output '{options.output}' names no output "
                             f"(outputs: {', '.join(repr(n) for n in names)})")
        order = wanted[:1]
    else:
        order.sort(key=lambda i: (0 if i < len(metas) and metas[i].label_file else 1,
                                  0 if np.issubdtype(np.dtype(outputs[i]["dtype"]), np.integer)
                                  and not _quant(outputs[i])[0] else 1))
    first_error: Optional[ModelError] = None
    readable: List[Tuple[OutputSpec, Optional[List[str]]]] = []
    plausible: List[str] = []  # outputs that could be the segmentation, read or not: "'name' [shape]"
    for i in order:
        meta = metas[i] if i < len(metas) else None
        names_here = list(labels) if labels else (md.labels(meta) if md is not None else None)
        described = f"'{outputs[i].get('name', i)}' {list(_spatial(outputs[i]['shape']))}"
        try:
            spec = read_output_spec(outputs[i], where, input_hw, meta, options,
                                    len(names_here) if names_here else None,
                                    producers.get(int(outputs[i]["index"]), ""), md)
        except ModelError as exc:
            first_error = first_error or exc
            if "not a segmentation model" not in str(exc):  # a setting could make it readable
                plausible.append(described)
            continue
        if spec.kind == "binary" and names_here is not None and len(names_here) > 2:
            raise ModelError(f"{where}: {len(names_here)} labels for a background/foreground output "
                             f"'{spec.name}': give model.labels with 1 or 2 names")
        if spec.kind == "binary" and names_here is not None and len(names_here) == 1:
            names_here = ["background", names_here[0]]
        elif spec.kind == "binary" and names_here is None:
            names_here = ["background", "foreground"]
        if options.output or (meta is not None and meta.label_file):
            return spec, names_here  # named by model.output, or labelled by the model's metadata
        readable.append((spec, names_here))
        plausible.append(described)
    if len(plausible) > 1:  # never guess between outputs that could each be the segmentation
        raise ModelError(f"{where}: {len(plausible)} outputs could be the segmentation ({', '.join(plausible)}) "
                         "and nothing in the model says which: set model.output to one of their names")
    if readable:
        return readable[0]
    assert first_error is not None
    raise first_error


def input_lut(spec: InputSpec, norm: Normalization = DEEPLAB) -> Optional[np.ndarray]:
    """LUT pixel -> quantized input (256 entries; 256x1x3 when channels differ), or None when raw
    pixels are already right.

    ``real = (pixel - mean) / std`` then ``q = real / scale + zero_point``. Coral's uint8 DeepLab
    models (scale 1/128, zero point 128, mean = std = 127.5) take raw pixels within one
    quantization step, as pycoral feeds them; any other case gets an exact LUT (applied by
    ``cv2.LUT``, ~0.2 ms at 513x513).
    """
    if spec.dtype == np.float32:
        return None
    info = np.iinfo(spec.dtype)
    pixels = np.arange(256, dtype=np.float64)[:, None]
    real = (pixels - np.asarray(norm.mean)) / np.asarray(norm.std)  # 256 x 3
    q = np.clip(np.round(real / spec.scale + spec.zero_point), info.min, info.max)
    if spec.dtype == np.uint8 and np.max(np.abs(q - pixels)) <= 1:
        return None
    lut = q.astype(spec.dtype).view(np.uint8)
    if (lut == lut[:, :1]).all():
        return np.ascontiguousarray(lut[:, 0])
    return np.ascontiguousarray(lut.reshape(256, 1, 3))


def quantize_zero(spec: InputSpec) -> Any:
    """The input value that means real 0 (what letterbox padding is filled with)."""
    if spec.dtype == np.float32:
        return 0.0
    info = np.iinfo(spec.dtype)
    return int(np.clip(spec.zero_point, info.min, info.max))


@dataclass
class Contract:
    """How to feed and read one model: its input, normalisation, chosen output and class names."""

    input: InputSpec
    normalization: Normalization
    output: OutputSpec
    labels: Optional[List[str]]
    metadata: Optional[ModelMetadata] = None
    metadata_problem: Optional[str] = None
    outputs: List[str] = field(default_factory=list)

    def describe(self) -> Dict[str, Any]:
        md = self.metadata
        return {
            "normalization": self.normalization.to_dict(),
            "output": self.output.to_dict(),
            "classes": self.output.classes if self.output.classes else (len(self.labels) if self.labels else None),
            "labels": self.labels,
            "metadata": ({"name": md.name, "description": md.description, "version": md.version,
                          "files": sorted(md.packed)} if md is not None else
                         ({"problem": self.metadata_problem} if self.metadata_problem else None)),
        }


def read_contract(interpreter: Any, mf: ModelFile, options: ModelOptions,
                  labels: Optional[Sequence[str]] = None) -> Contract:
    """Interpret a loaded (not necessarily allocated) interpreter's tensors with the model's metadata."""
    where = mf.path
    inputs, outputs = interpreter.get_input_details(), interpreter.get_output_details()
    if len(inputs) != 1:
        raise ModelError(f"{where}: {len(inputs)} inputs; a segmentation model has one image input")
    md = mf.metadata
    spec = read_input_spec(inputs[0], where)
    norm = resolve_normalization(spec, md.inputs[0] if md is not None and md.inputs else None, options, where)
    output, names = choose_output(outputs, where, (spec.height, spec.width), md, options, labels, mf.producers)
    if output.kind == "logits" and names and len(names) != output.classes and labels is None:
        log.warning("%s: the metadata has %d labels for %d classes; showing class ids", where, len(names),
                    output.classes)
        names = None
    return Contract(spec, norm, output, names, md, mf.metadata_problem,
                    [str(d.get("name", "")) for d in outputs])
