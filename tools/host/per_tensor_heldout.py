"""Judge the per-tensor cures on data they were not tuned on (issue #28 item 3).

    .venv-host/bin/python -m tools.host.per_tensor_heldout [OUT_DIR] [--skip-bias] [--ablate]
    (~15 min on 2 cores; models already in OUT_DIR are reused)

Coral's dm0.5 rebuilt at 513 (default 129x129 ArgMax head), quantized per tensor plain, with
``--equalize``, ``--equalize --bias-correct analytic`` and ``--split-subtensors 8`` (and
per-channel), then scored image by image on the 7 shared VOC val pairs:

- **A** calibration (activation ranges and bias statistics) on the 8 photos of
  ``../shared/test_data/images`` only; all 7 VOC pairs evaluated. Per image mIoU / pixel accuracy
  deltas, a bootstrap over images (10000 resamples of the 7, mIoU of the summed confusion) and
  leave-one-out of the difference to plain per-tensor.
- **B** 2-fold swap of roles: calibration on the 8 photos + the VOC pairs of the other fold,
  evaluation on this fold only (fold 1 = the first 4 ids, fold 2 = the last 3); the two folds'
  confusions are summed, so every image is scored by a model that never saw it.
- bias statistics: the per-layer bias change of ``analytic`` from the 8 photos vs from the 8
  photos + all 7 VOC images (how stable is it), and per depthwise layer the mean output shift on
  the VOC images without and with the correction computed from the photos (does the correction
  of that layer transfer).

``--ablate`` adds (split A) bias correction of the first, clipped depthwise layer alone and of
every layer but it; ``--skip-bias`` stops before the bias statistics (``heldout_eval.json``).

Writes ``heldout.json`` and prints the tables. Not a test: a measurement for docs/host-tools.md.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parents[2].parent / "shared" / "test_data"
VARIANTS = {
    "pc": {},
    "pt": {"per_channel": False},
    "pt_eq": {"per_channel": False, "equalize": True},
    "pt_eq_bca": {"per_channel": False, "equalize": True, "bias_correct": "analytic"},
    "pt_s8": {"per_channel": False, "subtensors": 8},
}
FOLD_VARIANTS = ("pt", "pt_eq", "pt_eq_bca", "pt_s8")
# (variant, baseline) differences reported besides "vs plain per-tensor"
PAIRS = (("pt_eq_bca", "pt_eq"), ("pt_s8", "pc"), ("pt_s8", "pt_eq_bca"),
         ("pt_eq_bca_first_only", "pt_eq"), ("pt_eq_bca_but_first", "pt_eq"))


def main(argv=None) -> int:
    os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    from edge_agent.inference.segmenter import Segmenter
    from tools.host import metrics
    from tools.host.bias_correct import bias_correct, output_shift
    from tools.host.datasets import VocDataset, calibration_images
    from tools.host.equalize import copy_model as tf_keras_clone, equalize, is_depthwise
    from tools.host.ptq import PTQOptions, quantize_keras, write_tflite
    from tools.host.rebuild import rebuild

    args = argv if argv is not None else sys.argv[1:]
    paths = [a for a in args if not a.startswith("--")]
    out = Path(paths[0] if paths else "out/per_tensor_heldout")
    out.mkdir(parents=True, exist_ok=True)
    voc = list(VocDataset(DATA / "voc"))
    ids = [s.id for s, _, _ in voc]
    photos = calibration_images(DATA / "images", 8)
    model = rebuild(DATA / "models" / "deeplabv3_mnv2_dm05_pascal_quant.tflite",
                    argmax=False)[0]

    def build(name, calib):
        path = out / f"{name}.tflite"
        if not path.is_file():
            opts = PTQOptions(**VARIANTS[name.split("@")[0]])
            write_tflite(quantize_keras(model, opts, calib), path)
        return path

    def confusions(path, subset):
        seg = Segmenter(str(path), runtime="auto", threads=1)
        return {s.id: metrics.confusion(seg.segment(img).mask, lab, 21)
                for s, img, lab in voc if s.id in subset}

    # A: photos only
    conf_a = {v: confusions(build(v, photos), ids) for v in VARIANTS}
    # B: 2-fold, the other fold's VOC images join the calibration
    folds = [ids[:4], ids[4:]]
    conf_b = {v: {} for v in FOLD_VARIANTS}
    for k, fold in enumerate(folds):
        calib = photos + [img for s, img, _ in voc if s.id not in fold]
        for v in FOLD_VARIANTS:
            conf_b[v].update(confusions(build(f"{v}@fold{k + 1}", calib), fold))

    if "--ablate" in args:  # bias correction of the first (clipped) depthwise only / all but it
        eq = equalize(model)[0]
        bc = bias_correct(eq, photos, per_channel=False, method="analytic")[0]
        first = "expanded_conv_depthwise"
        for name, src, keep in (("pt_eq_bca_first_only", eq, bc), ("pt_eq_bca_but_first", bc, eq)):
            path = out / f"{name}.tflite"
            if not path.is_file():
                m = tf_keras_clone(src)
                m.get_layer(first).set_weights(keep.get_layer(first).get_weights())
                write_tflite(quantize_keras(m, PTQOptions(per_channel=False), photos), path)
            conf_a[name] = confusions(path, ids)
            VARIANTS[name] = {}

    def miou(conf, subset):
        return 100 * metrics.mean_iou(sum(conf[i] for i in subset))

    rng = np.random.default_rng(0)
    boot = rng.integers(0, len(ids), size=(10000, len(ids)))
    result = {"ids": ids, "folds": folds, "A": {}, "B": {}}
    for label, confs, variants in (("A", conf_a, VARIANTS), ("B", conf_b, FOLD_VARIANTS)):
        print(f"\n== {label}: mIoU on all 7 (delta vs plain per-tensor, then pairs) ==")
        comparisons = [(v, "pt") for v in variants] + [
            (v, b) for v, b in PAIRS if v in variants and b in variants]
        for v, b in comparisons:
            c, base = confs[v], confs[b]
            per_image = {i: (100 * metrics.mean_iou(c[i]) - 100 * metrics.mean_iou(base[i]),
                             100 * metrics.pixel_accuracy(c[i])
                             - 100 * metrics.pixel_accuracy(base[i])) for i in ids}
            diffs = np.array([miou(c, [ids[j] for j in b]) - miou(base, [ids[j] for j in b])
                              for b in boot])
            loo = [miou(c, [j for j in ids if j != i]) - miou(base, [j for j in ids if j != i])
                   for i in ids]
            row = {"miou": miou(c, ids), "delta": miou(c, ids) - miou(base, ids),
                   "ci95": [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))],
                   "p_le_0": float(np.mean(diffs <= 0)), "loo": [min(loo), max(loo)],
                   "per_image": per_image,
                   "pixel_acc": 100 * metrics.pixel_accuracy(sum(c[i] for i in ids))}
            result[label][v if b == "pt" else f"{v}-{b}"] = row
            name = v if b == "pt" else f"{v} - {b}"
            print(f"{name:10s} mIoU {row['miou']:.2f}  delta {row['delta']:+.2f}  bootstrap 95% "
                  f"[{row['ci95'][0]:+.2f}, {row['ci95'][1]:+.2f}] P(<=0) {row['p_le_0']:.2f}  "
                  f"leave-one-out [{row['loo'][0]:+.2f}, {row['loo'][1]:+.2f}]  pixel acc "
                  f"{row['pixel_acc']:.2f}")
            print("           per image dmIoU/dacc: " + "  ".join(
                f"{i}: {a:+.2f}/{b:+.2f}" for i, (a, b) in per_image.items()))

    if "--skip-bias" in args:
        (out / "heldout_eval.json").write_text(json.dumps(result, indent=1))
        return 0
    # bias statistics: 8 photos vs 8 photos + 7 VOC, per layer; transfer to the VOC images
    eq = equalize(model)[0]
    voc_images = [img for _, img, _ in voc]
    bc8 = bias_correct(eq, photos, per_channel=False, method="analytic")[0]
    bc15 = bias_correct(eq, photos + voc_images, per_channel=False, method="analytic")[0]
    layers = []
    for layer in eq.layers:
        if layer.name not in [l.name for l in bc8.layers] or not layer.get_weights():
            continue
        if len(layer.get_weights()) != 2 or layer.get_weights()[0].ndim != 4:
            continue
        b0 = layer.get_weights()[1]
        d8 = bc8.get_layer(layer.name).get_weights()[1] - b0
        d15 = bc15.get_layer(layer.name).get_weights()[1] - b0
        layers.append({"layer": layer.name, "depthwise": bool(is_depthwise(layer)),
                       "mean_abs_8": float(np.mean(np.abs(d8))),
                       "mean_abs_15": float(np.mean(np.abs(d15))),
                       "rel_diff": float(np.linalg.norm(d8 - d15) / max(np.linalg.norm(d15),
                                                                       1e-12))})
    layers.sort(key=lambda r: -r["mean_abs_15"])
    print("\n== bias change (analytic, after equalization): 8 photos vs 8 photos + 7 VOC ==")
    for r in layers[:12]:
        print(f"{r['layer']:32s} mean|d| 8: {r['mean_abs_8']:.4f}  15: {r['mean_abs_15']:.4f}"
              f"  ||d8-d15||/||d15|| {r['rel_diff']:.2f}")
    rel = np.array([r["rel_diff"] for r in layers])
    print(f"all {len(layers)} layers: relative difference median {np.median(rel):.2f}, "
          f"max {rel.max():.2f}")
    result["bias_layers"] = layers
    print("\n== per depthwise layer: mean |E[y_q] - E[y]| on the 7 VOC images, correction "
          "from the 8 photos ==")
    shifts = []
    for layer in eq.layers:
        if not is_depthwise(layer):
            continue
        before = output_shift(eq, eq, layer.name, voc_images, per_channel=False)
        after = output_shift(eq, bc8, layer.name, voc_images, per_channel=False)
        shifts.append({"layer": layer.name, "before": before, "after": after})
        print(f"{layer.name:32s} {before:.4f} -> {after:.4f}  ({after / max(before, 1e-12):.2f}x)")
    result["depthwise_shift"] = shifts
    (out / "heldout.json").write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
