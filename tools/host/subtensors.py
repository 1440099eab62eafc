"""Subtensor quantization: split inverted-residual blocks into channel groups.

Per-tensor weights share one scale across all channels of a kernel; a depthwise kernel whose
channel ranges differ 10-30x then rounds most channels to a few levels. Splitting the chain
``conv A -> act -> depthwise D -> act`` into N groups of channels (each group its own CONV_2D and
DEPTHWISE_CONV_2D, so its own per-tensor weight and activation scales), concatenated before the
next conv B, gives N scales per layer while staying per-tensor, full-integer and made only of ops
the agent and the Edge TPU run (CONV_2D, DEPTHWISE_CONV_2D, CONCATENATION). Channels are sorted
by D's weight range first (permuting A's outputs, D and B's inputs leaves the float model
unchanged), so each group holds channels of similar range.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Tuple

import numpy as np
import tf_keras as keras

from edge_agent.errors import ConfigError

from .equalize import Pair, channel_ranges, copy_model, find_pairs, out_axis, range_spread

MAX_GROUPS = 8


@dataclass
class Chain:
    """``a`` -> ``act_a`` -> depthwise ``d`` -> ``act_d`` -> ``b``: the unit that gets split."""

    a: Pair
    d: Pair


def find_chains(model: keras.Model) -> List[Chain]:
    """Every conv -> act -> depthwise -> act -> conv chain (the MobileNetV2 block core)."""
    by_a = {p.a.name: p for p in find_pairs(model)}
    chains = []
    for p in by_a.values():
        nxt = by_a.get(p.b.name)
        if (nxt is not None and "Depthwise" in p.b.__class__.__name__ and p.act is not None
                and nxt.act is not None):
            chains.append(Chain(p, nxt))
    return chains


def _clone(layer, name: str, **changes):
    cfg = dict(layer.get_config(), name=name, **changes)
    return layer.__class__.from_config(cfg)


def _node_inputs(layer, tensors: Dict[int, object]):
    node = layer._inbound_nodes[0]
    inbound = node.input_tensors
    if isinstance(inbound, (list, tuple)):
        mapped = [tensors[id(t)] for t in inbound]
        return mapped if len(mapped) > 1 or isinstance(layer, keras.layers.Concatenate) else \
            mapped[0]
    return tensors[id(inbound)]


@dataclass
class SplitReport:
    blocks: int
    groups: int

    def text(self) -> str:
        return (f"subtensors: {self.blocks} conv/depthwise blocks split into {self.groups} "
                f"channel groups each")


def split_subtensors(model: keras.Model, groups: int, min_spread: float = 0.0
                     ) -> Tuple[keras.Model, SplitReport]:
    """The same function with every chain whose depthwise kernel's ``range_spread`` is at
    least ``min_spread`` split into ``groups`` channel groups."""
    if not 2 <= groups <= MAX_GROUPS:
        raise ConfigError(f"subtensor groups must be 2..{MAX_GROUPS}, not {groups}")
    model = copy_model(model)
    chains = {c.a.a.name: c for c in find_chains(model) if range_spread(c.d.a) >= min_spread}
    skip, permuted_b = set(), {}
    tensors: Dict[int, object] = {}
    inputs = [keras.Input(batch_shape=t.shape, name=t.name.split(":")[0]) for t in model.inputs]
    for old, new in zip(model.inputs, inputs):
        tensors[id(old)] = new
    for layer in model.layers:
        if isinstance(layer, keras.layers.InputLayer) or layer.name in skip:
            continue
        x = _node_inputs(layer, tensors)
        chain = chains.get(layer.name)
        if chain is None:  # a fresh copy: shared layers would make .output ambiguous
            weights = layer.get_weights()
            if layer.name in permuted_b:
                weights[0] = weights[0][:, :, permuted_b[layer.name], :]
            new = _clone(layer, layer.name)
            tensors[id(layer.output)] = new(x)
            new.set_weights(weights)
            continue
        a, act_a, d, act_d = chain.a.a, chain.a.act, chain.d.a, chain.d.act
        order = np.argsort(channel_ranges(d.get_weights()[0], out_axis(d)))
        parts = [g for g in np.array_split(order, min(groups, len(order))) if g.size]
        (ka, ba), (kd, bd) = a.get_weights(), d.get_weights()
        outs = []
        for i, g in enumerate(parts):
            conv = _clone(a, f"{a.name}_g{i}", filters=int(g.size))
            y = conv(x)
            conv.set_weights([ka[..., g], ba[g]])
            y = _clone(act_a, f"{act_a.name}_g{i}")(y)
            dw = _clone(d, f"{d.name}_g{i}")
            y = dw(y)
            dw.set_weights([kd[:, :, g, :], bd[g]])
            outs.append(_clone(act_d, f"{act_d.name}_g{i}")(y))
        tensors[id(act_d.output)] = keras.layers.Concatenate(name=f"{d.name}_concat")(outs)
        skip.update({act_a.name, d.name, act_d.name})
        permuted_b[chain.d.b.name] = np.concatenate(parts)
    outputs = [tensors[id(t)] for t in model.outputs]
    new_model = keras.Model(inputs, outputs if len(outputs) > 1 else outputs[0], name=model.name)
    return new_model, SplitReport(len(chains), groups)
