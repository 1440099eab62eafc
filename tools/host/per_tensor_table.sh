#!/usr/bin/env bash
# Reproduce the per-tensor table of docs/host-tools.md: rebuild Coral's dm0.5, quantize it with
# each per-tensor cure, evaluate everything in one run (VOC pairs + the golden bird).
#   bash tools/host/per_tensor_table.sh [OUT_DIR]   (default out/per_tensor; ~15 min on 2 cores)
# The recipes were chosen on these 7 VOC pairs; python -m tools.host.per_tensor_heldout re-judges
# them on held-out splits (docs/host-tools.md: only --split-subtensors 8 holds).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv-host/bin/python}
DATA=../shared/test_data
OUT=${1:-out/per_tensor}
mkdir -p "$OUT"
$PY -m tools.host rebuild $DATA/models/deeplabv3_mnv2_dm05_pascal_quant.tflite -o "$OUT/dm05.keras"
ptq() {  # ptq NAME FLAGS...
  local name=$1; shift
  $PY -m tools.host ptq "$OUT/dm05.keras" -o "$OUT/$name.tflite" \
      --calib $DATA/images --num-calib 8 "$@" | grep -v '^  \['
}
ptq dm05_float16 --mode float16
ptq dm05_pc
ptq dm05_pt --per-tensor
ptq dm05_pt_eq --per-tensor --equalize
ptq dm05_pt_eq_bca --per-tensor --equalize --bias-correct analytic
ptq dm05_pt_eq_bc --per-tensor --equalize --bias-correct empirical
ptq dm05_pt_s8 --per-tensor --split-subtensors 8
ptq dm05_pt_eq_s8 --per-tensor --equalize --split-subtensors 8
ptq dm05_pt_eq_bc_s2 --per-tensor --equalize --bias-correct --split-subtensors 2
ptq dm05_pt_eq_bc_s4 --per-tensor --equalize --bias-correct --split-subtensors 4
ptq dm05_pt_eq_bc_s8 --per-tensor --equalize --bias-correct --split-subtensors 8
ptq dm05_pt_eq_bc_s8_sel6 --per-tensor --equalize --bias-correct --split-subtensors 8 \
    --split-min-spread 6
$PY -m tools.host evaluate $DATA/models/deeplabv3_mnv2_dm05_pascal_quant.tflite \
    "$OUT"/dm05_float16.tflite "$OUT"/dm05_pc.tflite "$OUT"/dm05_pt.tflite \
    "$OUT"/dm05_pt_eq.tflite "$OUT"/dm05_pt_eq_bca.tflite "$OUT"/dm05_pt_eq_bc.tflite \
    "$OUT"/dm05_pt_s8.tflite "$OUT"/dm05_pt_eq_s8.tflite "$OUT"/dm05_pt_eq_bc_s2.tflite \
    "$OUT"/dm05_pt_eq_bc_s4.tflite "$OUT"/dm05_pt_eq_bc_s8.tflite \
    "$OUT"/dm05_pt_eq_bc_s8_sel6.tflite \
    --voc $DATA/voc --labels $DATA/models/pascal_voc_segmentation_labels.txt \
    --image $DATA/images/bird_segmentation.bmp --threads 1 --no-overlays --out "$OUT/eval"
$PY -m tools.host edgetpu-check "$OUT"/dm05_pt_eq_bc_s8.tflite --no-compile
# invoke ratio to Coral's model: medians of 30 interleaved runs on the bird, 1 thread (robust to
# a busy machine, unlike evaluate's per-image medians)
$PY - "$DATA" "$OUT" <<'PY'
import sys
from tests.host.measure import interleaved_invoke_ms
from tools.host.datasets import read_rgb
data, out = sys.argv[1:]
names = ["dm05_float16", "dm05_pc", "dm05_pt", "dm05_pt_eq", "dm05_pt_eq_bca", "dm05_pt_eq_bc",
         "dm05_pt_s8", "dm05_pt_eq_s8", "dm05_pt_eq_bc_s2", "dm05_pt_eq_bc_s4",
         "dm05_pt_eq_bc_s8", "dm05_pt_eq_bc_s8_sel6"]
paths = [f"{data}/models/deeplabv3_mnv2_dm05_pascal_quant.tflite"] + \
    [f"{out}/{n}.tflite" for n in names]
ms, runtime = interleaved_invoke_ms(paths, read_rgb(f"{data}/images/bird_segmentation.bmp"), 1)
print(f"invoke ({runtime}, 1 thread, medians of 30 interleaved runs):")
for name, t in zip(["coral"] + names, ms):
    print(f"  {name:24s} {t:6.1f} ms  ratio {t / ms[0]:.2f}")
PY
