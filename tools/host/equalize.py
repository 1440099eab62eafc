"""Cross-layer equalization (Nagel et al., ICCV 2019) for per-tensor weight quantization.

For a pair conv A -> activation -> conv B (conv, depthwise or dilated depthwise), scaling A's
output channel i by ``1/s_i`` and B's input channel i by ``s_i`` leaves the float model unchanged
(ReLU is positively homogeneous) while ``s_i = sqrt(r1_i / r2_i)`` gives both layers the same
per-channel weight range, which is what one per-tensor scale needs. ReLU6 is homogeneous only
where it does not clip: a ReLU6 channel is scaled only if its pre-activation provably never
reaches 6 (interval bounds from the input range, no data needed), and only by factors that keep it
below 6, so the float model is unchanged for every input.
The long story and the measurements are in docs/host-tools.md.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import tf_keras as keras


CONV_KINDS = ("Conv2D", "DepthwiseConv2D", "DilatedDepthwiseConv2D")


def is_conv(layer) -> bool:
    return layer.__class__.__name__ in CONV_KINDS and len(layer.get_weights()) == 2


def is_depthwise(layer) -> bool:
    return "Depthwise" in layer.__class__.__name__


def out_axis(layer) -> int:
    """Output-channel axis of the kernel (Keras: depthwise (kh,kw,C,1), conv (kh,kw,in,out))."""
    return 2 if is_depthwise(layer) else 3


def channel_ranges(kernel: np.ndarray, axis: int) -> np.ndarray:
    """max |w| per index of ``axis``."""
    return np.abs(np.moveaxis(kernel, axis, 0)).reshape(kernel.shape[axis], -1).max(axis=1)


def consumers(layer) -> List:
    return [node.outbound_layer for node in layer._outbound_nodes]


@dataclass
class Pair:
    """conv ``a`` -> optional activation ``act`` (ReLU/ReLU6 layer) -> conv ``b``."""

    a: keras.layers.Layer
    act: Optional[keras.layers.Layer]
    b: keras.layers.Layer

    @property
    def clip(self) -> Optional[float]:
        """The activation's upper clip (6.0 for ReLU6), None for plain ReLU / no activation."""
        if self.act is None or self.act.max_value is None:
            return None
        return float(self.act.max_value)


def plain_relu(layer) -> bool:
    return (isinstance(layer, keras.layers.ReLU) and not float(layer.negative_slope)
            and not float(layer.threshold))


def find_pairs(model: keras.Model) -> List[Pair]:
    """Every conv -> [ReLU/ReLU6] -> conv chain whose middle tensor feeds nothing else."""
    pairs = []
    for a in model.layers:
        if not is_conv(a) or len(consumers(a)) != 1:
            continue
        act, nxt = None, consumers(a)[0]
        if plain_relu(nxt):
            act, nxt = nxt, (consumers(nxt)[0] if len(consumers(nxt)) == 1 else None)
        if nxt is not None and is_conv(nxt):
            pairs.append(Pair(a, act, nxt))
    return pairs


def producers(layer) -> List:
    node = layer._inbound_nodes[0]
    inbound = node.inbound_layers
    return list(inbound) if isinstance(inbound, (list, tuple)) else [inbound]


def _conv_interval(layer, lo: np.ndarray, hi: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Per-output-channel bounds of a conv whose input channels lie in [lo, hi]."""
    w, b = layer.get_weights()
    lo, hi = np.minimum(lo, 0), np.maximum(hi, 0)  # SAME padding feeds zeros
    if is_depthwise(layer):
        pos, neg = np.maximum(w, 0).sum(axis=(0, 1, 3)), np.minimum(w, 0).sum(axis=(0, 1, 3))
        return pos * lo + neg * hi + b, pos * hi + neg * lo + b
    pos, neg = np.maximum(w, 0).sum(axis=(0, 1)), np.minimum(w, 0).sum(axis=(0, 1))
    return lo @ pos + hi @ neg + b, hi @ pos + lo @ neg + b


def preactivation_bounds(model: keras.Model, input_range: Tuple[float, float] = (-1.0, 1.0)
                         ) -> Dict[str, np.ndarray]:
    """Guaranteed per-channel upper bound of every conv's output, for any input in range.

    Interval arithmetic from the input (``real = pixel / 127.5 - 1`` lies in [-1, 1]) through
    convs, ReLU/ReLU6 and adds; a ReLU6 caps its channels at 6 whatever comes in, which is what
    keeps the bounds of the depthwise layers (inputs in [0, 6]) tight enough to use.
    """
    bounds: Dict[str, Tuple[np.ndarray, np.ndarray]] = {}
    upper: Dict[str, np.ndarray] = {}
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer):
            c = int(layer.output.shape[-1])
            bounds[layer.name] = (np.full(c, input_range[0]), np.full(c, input_range[1]))
            continue
        ins = [bounds.get(p.name) for p in producers(layer)]
        if any(b is None for b in ins):
            continue
        if is_conv(layer) and len(ins) == 1:
            bounds[layer.name] = _conv_interval(layer, *ins[0])
            upper[layer.name] = bounds[layer.name][1]
        elif plain_relu(layer) and len(ins) == 1:
            top = np.inf if layer.max_value is None else float(layer.max_value)
            bounds[layer.name] = (np.clip(ins[0][0], 0, top), np.clip(ins[0][1], 0, top))
        elif isinstance(layer, keras.layers.Add):
            bounds[layer.name] = (sum(b[0] for b in ins), sum(b[1] for b in ins))
    return upper


@dataclass
class EqualizeReport:
    pairs: int
    scaled_channels: int
    frozen_channels: int  # ReLU6 channels that may clip: left unscaled
    spread_before: float  # mean over equalized layers of max/median per-channel weight range
    spread_after: float

    def text(self) -> str:
        return (f"equalization: {self.pairs} conv pairs, {self.scaled_channels} channels scaled, "
                f"{self.frozen_channels} ReLU6 channels left (they may clip); per-channel weight "
                f"range spread (max/median, mean) {self.spread_before:.1f} -> "
                f"{self.spread_after:.1f}")


def range_spread(layer) -> float:
    """max / median of a conv's per-output-channel weight ranges (1 = one scale fits all)."""
    r = channel_ranges(layer.get_weights()[0], out_axis(layer))
    return float(r.max() / max(np.median(r), 1e-12))


def _spread(pairs: Sequence[Pair]) -> float:
    layers = {p.a.name: p.a for p in pairs}
    layers.update({p.b.name: p.b for p in pairs})
    return float(np.mean([range_spread(layer) for layer in layers.values()])) if layers else 1.0


def copy_model(model: keras.Model) -> keras.Model:
    """An independent copy (same graph and weights) so the caller's model is left untouched."""
    clone = keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


def equalize(model: keras.Model, iterations: int = 20) -> Tuple[keras.Model, EqualizeReport]:
    """Equalized copy of ``model`` (same float outputs for any input) and what was done."""
    model = copy_model(model)
    pairs = find_pairs(model)
    before = _spread(pairs)
    bounds = preactivation_bounds(model)
    frozen, touched = set(), set()  # (layer, channel)
    for _ in range(iterations):
        for p in pairs:
            (wa, ba), (wb, bb) = p.a.get_weights(), p.b.get_weights()
            r1 = channel_ranges(wa, out_axis(p.a))
            r2 = channel_ranges(wb, 2)  # input-channel axis of both conv and depthwise kernels
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.maximum(r2, 1e-30)), 1.0)
            if p.clip is not None:
                m = bounds.get(p.a.name)
                if m is None:
                    s = np.ones_like(s)
                else:
                    ok = m <= p.clip
                    s = np.where(ok, np.maximum(s, m / p.clip), 1.0)
                    bounds[p.a.name] = m / s
                    frozen.update((p.a.name, int(i)) for i in np.flatnonzero(~ok))
            shape_a = [1] * wa.ndim
            shape_a[out_axis(p.a)] = -1
            shape_b = [1] * wb.ndim
            shape_b[2] = -1
            p.a.set_weights([wa / s.reshape(shape_a), ba / s])
            p.b.set_weights([wb * s.reshape(shape_b), bb])
            touched.update((p.a.name, int(i)) for i in np.flatnonzero(np.abs(s - 1) > 1e-6))
    report = EqualizeReport(len(pairs), len(touched), len(frozen), before, _spread(pairs))
    return model, report
