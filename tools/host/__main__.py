"""``python -m tools.host <command>`` (``edge-agent host <command>``): the host-side model
toolchain's command line.

Each command is a thin wrapper over one module; failures the user can cause are
``EdgeAgentError``s printed as one line with a non-zero exit code. Where the ``host`` extra is
not installed (the device venv), every command says in one line what to install and exits 2;
``--help`` still works. This module itself imports nothing beyond the standard library and
``edge_agent``.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path
from typing import List, Optional, Sequence

from edge_agent.errors import ConfigError, EdgeAgentError

DEFAULT_VOC = "../shared/test_data/voc"
DEFAULT_PROG = "python -m tools.host"
# What the ``host`` extra brings that the device install lacks (import names).
HOST_MODULES = ("tensorflow", "tf_keras", "tensorflow_model_optimization", "tqdm")
INSTALL_HINT = "pip install 'edge-agent[host]'"


def missing_host_modules() -> List[str]:
    """Import names of the host extra's packages that are not installed (nothing is imported)."""
    missing = []
    for name in HOST_MODULES:
        try:
            if importlib.util.find_spec(name) is None:
                missing.append(name)
        except (ImportError, ValueError):  # a broken install counts as missing
            missing.append(name)
    return missing


def not_installed_message(missing: Sequence[str]) -> str:
    return (f"the host tools need TensorFlow, tf-keras and tfmot (not installed here: "
            f"{', '.join(missing)}): {INSTALL_HINT}")


def _size(values: Optional[Sequence[int]]):
    if values is None:
        return None
    if len(values) == 1:
        values = [values[0], values[0]]
    if len(values) != 2 or min(values) < 16:
        raise ConfigError(f"--input-size takes H [W] >= 16, got {values}")
    return (int(values[0]), int(values[1]))


def _argmax_flag(args) -> Optional[bool]:
    return {None: None, "yes": True, "no": False}[args.argmax]


def load_source(path: str, input_size=None, argmax: Optional[bool] = None):
    """Keras model from a .keras/.h5/SavedModel, or rebuilt from a DeepLab .tflite."""
    from .rebuild import load_model, rebuild
    from .deeplab import with_argmax, without_argmax

    if path.endswith(".tflite"):
        return rebuild(path, input_size=input_size, argmax=argmax)[0]
    model = load_model(path)
    if input_size is not None and tuple(model.input_shape[1:3]) != tuple(input_size):
        raise ConfigError(f"{path} is fixed at {model.input_shape[1:3]}: rebuild it from a "
                          f".tflite to change the input size")
    if argmax is True:
        return with_argmax(model)
    return without_argmax(model) if argmax is False else model


def cmd_build(args) -> int:
    from .deeplab import DeepLabConfig, build_deeplab
    from .rebuild import describe, save_model

    cfg = DeepLabConfig(input_size=_size(args.input_size), num_classes=args.num_classes,
                        depth_multiplier=args.depth_multiplier, output_stride=args.output_stride,
                        atrous_rates=tuple(args.atrous_rates), decoder=args.decoder,
                        argmax=args.argmax == "yes")
    model = build_deeplab(cfg)
    out = save_model(model, args.output)
    print(f"{describe(cfg)}: {model.count_params():,} parameters (random init) -> {out}")
    return 0


def cmd_rebuild(args) -> int:
    from .rebuild import describe, rebuild, save_model

    model, cfg = rebuild(args.source, _size(args.input_size), _argmax_flag(args),
                         emulate_quant=args.emulate_quant)
    out = save_model(model, args.output)
    kind = " (float64, source activation quantization emulated)" if args.emulate_quant else ""
    print(f"rebuilt {describe(cfg)}{kind} from {args.source} -> {out}")
    if args.check_image:
        from .compare import keras_vs_tflite

        value = keras_vs_tflite(model, args.source, args.check_image)
        print(f"agreement rebuilt float vs source on {args.check_image}: {value:.4f}")
    return 0


def cmd_ptq(args) -> int:
    from .datasets import calibration_images
    from .ptq import PTQOptions, calibration_summary, quantize_keras, write_tflite

    opts = PTQOptions(args.mode, args.io_type, not args.per_tensor, _argmax_flag(args),
                      args.upsample, args.equalize, args.bias_correct,
                      args.split_subtensors, args.split_min_spread).validate()
    model = load_source(args.model, _size(args.input_size))
    images = calibration_images(args.calib, args.num_calib) if args.mode == "int8" else []
    out = write_tflite(quantize_keras(model, opts, images), args.output)
    print(f"{args.mode} model -> {out} ({out.stat().st_size / 1e6:.2f} MB)")
    if args.mode == "int8":
        print(calibration_summary(out, len(images)))
    return 0


def cmd_qat(args) -> int:
    from . import qat
    from .datasets import VocDataset, calibration_images
    from .ptq import write_tflite
    from .rebuild import save_model

    opts = qat.QATOptions(steps=args.steps, delay_steps=args.delay_steps,
                          learning_rate=args.lr, batch_size=args.batch_size,
                          checkpoint_dir=args.checkpoint_dir,
                          checkpoint_every=args.checkpoint_every).validate()
    model = load_source(args.model, _size(args.input_size), argmax=False)
    dataset = VocDataset(args.voc, args.split)
    qmodel = qat.fine_tune(model, dataset, opts)
    if args.save_keras:
        print(f"QAT Keras model -> {save_model(qmodel, args.save_keras)}")
    images = calibration_images(args.voc, args.num_calib)
    data = qat.export(qmodel, images, args.io_type, argmax=args.argmax != "no")
    out = write_tflite(data, args.output)
    print(f"QAT int8 model -> {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def cmd_evaluate(args) -> int:
    from .evaluate import evaluate, markdown, write_report

    report = evaluate(args.models, args.voc, args.split, args.labels, args.runtime,
                      args.threads, images=args.image)
    print(markdown(report))
    if args.out:
        written = write_report(report, args.out, args.voc, args.split, not args.no_overlays)
        print(f"wrote {len(written)} files to {args.out}")
    return 0


def cmd_edgetpu_check(args) -> int:
    from .edgetpu_check import check

    report = check(args.model, compile_model=not args.no_compile, out_dir=args.out_dir)
    print(report.text())
    return 1 if args.strict and report.errors else 0


def cmd_convert_frozen(args) -> int:
    from .datasets import calibration_images
    from .frozen import convert_frozen
    from .ptq import PTQOptions, write_tflite

    opts = PTQOptions(args.mode, args.io_type, not args.per_tensor).validate()
    images = calibration_images(args.calib, args.num_calib) if args.mode == "int8" else []
    data = convert_frozen(args.graph, args.input_array, args.output_arrays,
                          _size(args.input_size), opts, images)
    out = write_tflite(data, args.output)
    print(f"{args.mode} model from frozen graph -> {out} ({out.stat().st_size / 1e6:.2f} MB)")
    return 0


def cmd_sweep(args) -> int:
    from .sweep import run

    return run(args)


def _add_sweep(sub) -> None:
    from edge_agent.cli.remote import add_broker_arguments

    p = sub.add_parser("sweep", help="candidates over input size x scheme: mIoU, device p50, "
                       "Pareto plot, pick for a target",
                       description="Build every input size x quantization scheme of the DeepLab "
                       "source(s), evaluate them on a labelled dataset (calibration images are "
                       "never evaluated), benchmark them on devices through the broker (staged, "
                       "not made current, removed afterwards) or locally, write sweep.csv, "
                       "sweep.json and pareto.png, and pick the most accurate one that meets a "
                       "target. Resumable: finished steps are cached in --out.")
    p.add_argument("sources", nargs="+", metavar="SOURCE.tflite",
                   help="DeepLab .tflite (Coral uint8 or float); several give several depth "
                        "multipliers")
    p.add_argument("--out", required=True, help="folder for models, table, plot and cache")
    p.add_argument("--sizes", type=int, nargs="+", default=[513, 449, 385, 321, 257],
                   help="input sizes (default 513 449 385 321 257)")
    p.add_argument("--schemes", nargs="+", default=["per-channel", "per-tensor", "fp16"],
                   help="per-channel | per-tensor (plain per-tensor weights) | per-tensor-s8 "
                        "(+ 8 subtensors, the per-tensor cure that holds on held-out images) | "
                        "fp16 | qat (default: per-channel per-tensor fp16)")
    data = p.add_argument_group("data (calibration images are never evaluated)")
    data.add_argument("--voc", help="VOC-layout dataset to evaluate on")
    data.add_argument("--split", default="val", help="its ImageSets/Segmentation split (default val)")
    data.add_argument("--pairs", help="or a folder of image/mask pairs (images/ + masks/, or "
                      "<name>.jpg + <name>_mask.png)")
    data.add_argument("--calib", help="calibration image folder (images equal to evaluation images "
                      "are left out); default: hold out the first --num-calib pairs")
    data.add_argument("--num-calib", type=int, default=8, help="calibration images (default 8)")
    data.add_argument("--labels", help="class names file, sent with the models to the devices")
    data.add_argument("--qat-voc", help="qat scheme: VOC-layout training data")
    data.add_argument("--qat-split", default="train", help="qat scheme: its split (default train)")
    data.add_argument("--qat-steps", type=int, default=200)
    b = p.add_argument_group("benchmark")
    b.add_argument("--device", "-d", action="append", metavar="ID",
                   help="benchmark on this device through the broker (repeatable); none: locally")
    b.add_argument("--runs", type=int, default=20, help="measured runs per candidate (default 20)")
    b.add_argument("--warmup", type=int, default=2)
    b.add_argument("--threads", type=int, help="interpreter threads (default: as configured / "
                   "the runtime's default)")
    b.add_argument("--frame-size", default="640x480", help="benchmark frame WxH (default 640x480)")
    b.add_argument("--latency", default="end_to_end", choices=("end_to_end", "invoke"),
                   help="p50 the target and the plot use (default end_to_end)")
    b.add_argument("--keep", action="store_true", help="leave the staged candidates in the "
                   "devices' stores")
    b.add_argument("--timeout", type=float, default=300.0, help="seconds per device request")
    b.add_argument("--discover-s", type=float, default=1.0)
    b.add_argument("--tf-threads", type=int, default=2, help="TensorFlow threads for building "
                   "(default 2)")
    t = p.add_argument_group("choosing")
    t.add_argument("--target-fps", type=float, help="pick the most accurate candidate whose p50 "
                   "is at most 1000/N ms on every device")
    t.add_argument("--max-latency-ms", type=float, help="... at most M ms")
    t.add_argument("--deploy", action="store_true", help="deploy the pick to the --device(s)")
    t.add_argument("--deploy-name", help="model name for --deploy (default sweep-<candidate>)")
    t.add_argument("--sign-key", metavar="FILE", help="ed25519 private key to sign the staged "
                   "candidates and the deployment with")
    add_broker_arguments(p)
    p.set_defaults(func=cmd_sweep)


def _ptq_flags(p: argparse.ArgumentParser, argmax: bool = True) -> None:
    p.add_argument("--mode", default="int8", help="dynamic | float16 | int8 (default int8)")
    p.add_argument("--io-type", default="uint8", help="int8-mode I/O: uint8 | int8 | float32")
    p.add_argument("--per-tensor", action="store_true", help="per-tensor weights (old Edge TPU "
                   "compilers); default per-channel")
    p.add_argument("--calib", default=DEFAULT_VOC, help="calibration image folder or VOC root")
    p.add_argument("--num-calib", type=int, default=100, help="calibration images (default 100)")
    if argmax:
        p.add_argument("--argmax", choices=("yes", "no"), default="yes",
                       help="ArgMax in the graph (default yes: label map out, fastest)")
        p.add_argument("--upsample", type=int, default=4, choices=(1, 2, 4, 8, 16),
                       help="in-graph bilinear upsampling of the 1/16 logits: 16 = full input "
                            "size like Coral's models; default 4 (129x129 for 513: about 2x "
                            "faster on the CPU, the agent resizes the label map)")


def build_parser(prog: str = DEFAULT_PROG, note: Optional[str] = None) -> argparse.ArgumentParser:
    """The command line; ``note`` (e.g. what to install) ends every command's ``--help``."""
    parser = argparse.ArgumentParser(prog=prog, description="Host-side DeepLab model tools.",
                                     epilog=note)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("build", help="build a (random-init) DeepLab Keras model")
    p.add_argument("-o", "--output", required=True, help=".keras/.h5 file or SavedModel dir")
    p.add_argument("--input-size", type=int, nargs="+", default=[513])
    p.add_argument("--num-classes", type=int, default=21)
    p.add_argument("--depth-multiplier", type=float, default=0.5)
    p.add_argument("--output-stride", type=int, default=16)
    p.add_argument("--atrous-rates", type=int, nargs="*", default=[],
                   help="ASPP atrous branches, e.g. 6 12 18 (default: 1x1 branch only)")
    p.add_argument("--decoder", action="store_true", help="DeepLabV3+ decoder")
    p.add_argument("--argmax", choices=("yes", "no"), default="no")
    p.set_defaults(func=cmd_build)

    p = sub.add_parser("rebuild", help="float Keras model from a DeepLab .tflite")
    p.add_argument("source", help="quantized or float DeepLab .tflite")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--input-size", type=int, nargs="+", help="re-target H [W]")
    p.add_argument("--argmax", choices=("yes", "no"), default=None)
    p.add_argument("--check-image", help="print agreement rebuilt vs source on this image")
    p.add_argument("--emulate-quant", action="store_true",
                   help="verification graph: float64 + the quantized source's own activation "
                        "rounding (reproduces the source exactly; not for ptq/qat)")
    p.set_defaults(func=cmd_rebuild)

    p = sub.add_parser("ptq", help="post-training quantization to TFLite")
    p.add_argument("model", help=".keras/.h5/SavedModel, or a DeepLab .tflite (rebuilt first)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--input-size", type=int, nargs="+", help="fixed input H [W]")
    _ptq_flags(p)
    p.add_argument("--equalize", action="store_true", help="cross-layer equalization of "
                   "conv/depthwise pairs first (float outputs unchanged; off by default: its "
                   "--per-tensor gain is within noise on held-out images)")
    p.add_argument("--bias-correct", nargs="?", const="empirical", metavar="METHOD",
                   help="cancel the mean output shift of weight rounding: empirical (default, "
                        "layer by layer on the calibration images) | analytic (off by default: "
                        "its gain does not hold on held-out images)")
    p.add_argument("--split-subtensors", type=int, default=1, metavar="N",
                   help="split each conv/depthwise block into N channel groups (2..8), each with "
                        "its own per-tensor scales (default 1: off)")
    p.add_argument("--split-min-spread", type=float, default=0.0, metavar="S",
                   help="split only blocks whose depthwise per-channel weight ranges spread "
                        "(max/median) is >= S (default 0: every block)")
    p.set_defaults(func=cmd_ptq)

    p = sub.add_parser("qat", help="quantization-aware fine-tuning, export uint8 TFLite")
    p.add_argument("model", help=".keras/.h5/SavedModel, or a DeepLab .tflite (rebuilt first)")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--voc", default=DEFAULT_VOC, help="VOC-layout dataset root")
    p.add_argument("--split", default="train", help="ImageSets/Segmentation/<split>.txt")
    p.add_argument("--input-size", type=int, nargs="+")
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--delay-steps", type=int, default=0, help="float steps before fake-quant")
    p.add_argument("--lr", type=float, default=3e-5)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--checkpoint-dir", help="save/resume checkpoints here")
    p.add_argument("--checkpoint-every", type=int, default=500)
    p.add_argument("--save-keras", help="also save the fake-quant Keras model")
    p.add_argument("--io-type", default="uint8")
    p.add_argument("--num-calib", type=int, default=8, help="images for leftover ranges")
    p.add_argument("--argmax", choices=("yes", "no"), default="yes")
    p.set_defaults(func=cmd_qat)

    p = sub.add_parser("evaluate", help="mIoU/accuracy/agreement/size/latency table")
    p.add_argument("models", nargs="+", help=".tflite models (the first is the overlay reference)")
    p.add_argument("--voc", default=DEFAULT_VOC)
    p.add_argument("--split", default="val")
    p.add_argument("--labels", help="label file (one class name a line)")
    p.add_argument("--out", help="write results.md, results.csv, overlays/ here")
    p.add_argument("--no-overlays", action="store_true")
    p.add_argument("--image", action="append", default=[], help="an unlabelled image (e.g. the "
                   "golden bird) to report pairwise agreement on; repeatable")
    p.add_argument("--runtime", default="auto")
    p.add_argument("--threads", type=int)
    p.set_defaults(func=cmd_evaluate)

    p = sub.add_parser("edgetpu-check", help="ops/dtypes the Edge TPU cannot map; compile")
    p.add_argument("model")
    p.add_argument("--no-compile", action="store_true", help="analysis only")
    p.add_argument("--out-dir", type=Path, help="edgetpu_compiler output folder")
    p.add_argument("--strict", action="store_true", help="exit 1 if an op would leave the TPU")
    p.set_defaults(func=cmd_edgetpu_check)

    p = sub.add_parser("convert-frozen", help="TF1 frozen GraphDef (.pb) -> TFLite")
    p.add_argument("graph", help="frozen_inference_graph.pb")
    p.add_argument("-o", "--output", required=True)
    p.add_argument("--input-array", required=True, help="input tensor (node) name")
    p.add_argument("--output-arrays", required=True, nargs="+")
    p.add_argument("--input-size", type=int, nargs="+", required=True)
    _ptq_flags(p, argmax=False)
    p.set_defaults(func=cmd_convert_frozen)

    _add_sweep(sub)
    for p in sub.choices.values():
        p.epilog = note
    return parser


def main(argv: Optional[List[str]] = None, prog: str = DEFAULT_PROG) -> int:
    if argv is None and Path(sys.argv[0]).name == "edge-agent-host":  # the installed script
        prog = "edge-agent-host"
    argv = list(sys.argv[1:] if argv is None else argv)
    missing = missing_host_modules()
    note = f"Not installed here: {INSTALL_HINT}" if missing else None
    parser = build_parser(prog, note)
    if missing and not {"-h", "--help"} & set(argv):
        print(f"error: {not_installed_message(missing)}", file=sys.stderr)
        return 2
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except ModuleNotFoundError as exc:  # a host dependency broken after the check above
        if (exc.name or "").split(".")[0] not in HOST_MODULES:
            raise
        print(f"error: {not_installed_message([exc.name])}", file=sys.stderr)
        return 2
    except EdgeAgentError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
