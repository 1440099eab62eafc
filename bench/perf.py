#!/usr/bin/env python3
"""edge-agent performance benchmark: one command, one process, interleaved rounds, ratios.

    .venv/bin/python bench/perf.py [--quick] [--out DIR]

What it measures (see docs/performance.md for a result and the reading of it):

* latency   per-frame end-to-end latency of the agent's own per-frame code
            (``daemon.stages.run_frame``, the stage functions the pipeline threads run: letterbox,
            memcpy, invoke, label map, crop, class fractions, PNG, result JSON, publish) divided by ``invoke()`` alone, at 640x480,
            1280x720 and 1920x1080, for the depth-1.0 and 0.5 Coral models; and the same frame
            done the naive way the public examples do it (PIL LANCZOS resize to the input size,
            ``set_tensor``/``get_tensor``, ``np.argmax`` when the output is logits, PIL NEAREST
            back to full resolution, PIL PNG) as the peer baseline.
* agent     the real daemon (``python -m edge_agent run``) as a subprocess on a folder source,
            publishing to a real mosquitto (``EmbeddedBroker``): pipelined masks/s divided by
            1 / invoke time, for interpreter threads 1 and 2; its peak RSS (VmHWM), the time from
            process start to the first mask received by a subscriber, and MQTT bytes per mask.
* throughput the real daemon on every kind of source on all cores, in two layouts (``--layouts``):
            one interpreter with a thread per core ("1xN", the default config) and one
            interpreter per core with one thread each ("Nx1", ``model.interpreters``): a
            folder of 1080p JPEGs, of 720p JPEGs, an MJPG video file (made with OpenCV in a tmp
            dir) and the raw synthetic pattern. Measured ratio = masks/s x ``invoke()`` alone
            (interleaved before/after each run) next to the limit model
            ``invoke / (invoke + other CPU ms / cores)``, where "other CPU" is the CPU time
            (``time.thread_time``, not wall) of every per-frame stage but ``invoke()`` (decode,
            letterbox, memcpy, label map, crop/fractions, PNG/JSON, MQTT publish), measured
            in-process on the same source; plus the agent's, mosquitto's and the subscriber's
            process CPU per mask (``/proc``, ``os.times``) and the machine load; and how much
            the masks of the same frames differ between reduced and full-size decoding.
* runtimes  ``invoke()`` of ai-edge-litert vs tflite-runtime (.venv-tflite) vs tensorflow.lite
            (.venv-host), each in a worker subprocess of that venv (only one works at a time).
* png/resize/argmax micro-measurements behind the choices in the code.

Every comparison alternates its configurations in rounds so that drift (thermal, other load on
the machine) hits all of them equally; medians are reported. Bench-only dependencies: Pillow
(the naive baseline) and matplotlib (the plot).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

SHARED = (REPO / ".." / "shared" / "test_data").resolve()
MODELS = SHARED / "models"
IMAGES = SHARED / "images"
LABELS = MODELS / "pascal_voc_segmentation_labels.txt"
MODEL_FILES = {
    "dm1.0": MODELS / "deeplabv3_mnv2_pascal_quant.tflite",
    "dm0.5": MODELS / "deeplabv3_mnv2_dm05_pascal_quant.tflite",
}
SIZES = {"640x480": (480, 640), "1280x720": (720, 1280), "1920x1080": (1080, 1920)}
TARGETS = {
    "latency_640x480": 1.10, "latency_1920x1080": 1.25, "throughput": 0.90,
    "overhead_vs_naive_1080p": 2.0, "peak_rss_mb": 150.0, "first_mask_s": 3.0,
}
RUNTIME_VENVS = {
    "litert": REPO / ".venv" / "bin" / "python",
    "tflite-runtime": REPO / ".venv-tflite" / "bin" / "python",
    "tensorflow": REPO / ".venv-host" / "bin" / "python",
}


def median(values: List[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# -- frames --------------------------------------------------------------------------------------

def read_rgb(path: Path):
    import cv2

    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise SystemExit(f"cannot read {path} (is ../shared/test_data there?)")
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def bench_frames() -> Dict[str, Any]:
    """Real photos at the three sizes: 720p and 1080p as shipped, 640x480 a 4:3 crop of 720p."""
    import cv2

    cat720 = read_rgb(IMAGES / "cat_720p.jpg")
    crop = cat720[:, (1280 - 960) // 2:(1280 + 960) // 2]  # 960x720, 4:3
    frames = {
        "640x480": cv2.resize(crop, (640, 480), interpolation=cv2.INTER_AREA),
        "1280x720": cat720,
        "1920x1080": read_rgb(IMAGES / "cat_1080p.jpg"),
    }
    for name, frame in frames.items():
        assert frame.shape[:2] == SIZES[name], (name, frame.shape)
    return frames


# -- per-frame latency ---------------------------------------------------------------------------

class CountingSink:
    """The pipeline's sink for in-process timing: keeps payload sizes, sends nothing."""

    def __init__(self) -> None:
        self.bytes: Dict[str, List[int]] = {}

    def publish(self, suffix: str, payload: Any, qos: Optional[int] = None, retain: bool = False) -> bool:
        self.bytes.setdefault(suffix, []).append(len(payload))
        return True


def naive_frame(interpreter, in_idx: int, out_idx: int, size_hw: Tuple[int, int], frame, sink) -> float:
    """The public examples' per-frame path (pycoral semantic_segmentation.py style); its invoke ms."""
    import numpy as np
    from PIL import Image

    img = Image.fromarray(frame)
    resized = img.resize((size_hw[1], size_hw[0]), Image.LANCZOS)
    interpreter.set_tensor(in_idx, np.asarray(resized)[np.newaxis])
    t0 = time.perf_counter()
    interpreter.invoke()
    invoke_ms = (time.perf_counter() - t0) * 1e3
    result = interpreter.get_tensor(out_idx)[0]
    if result.ndim == 3 and result.shape[-1] > 1:
        result = np.argmax(result, axis=-1)
    mask = Image.fromarray(result.astype(np.uint8)).resize(img.size, Image.NEAREST)
    buf = io.BytesIO()
    mask.save(buf, format="PNG")
    sink.publish("mask", buf.getvalue())
    return invoke_ms


def measure_latency(frames: Dict[str, Any], rounds: int, per_round: int, threads: int) -> Dict[str, Any]:
    from edge_agent.output.stages import PIPELINE_STAGES, FrameOutput, run_frame
    from edge_agent.inference.segmenter import Segmenter
    from edge_agent.sources.base import Frame

    setups = {}
    for name, path in MODEL_FILES.items():
        seg = Segmenter(str(path), labels=str(LABELS), threads=threads)
        sink = CountingSink()
        pipe = FrameOutput()
        it = seg.model.loaded.interpreter
        setups[name] = (seg, pipe, sink, it)
    samples: Dict[Tuple[str, str, str], List[float]] = {}
    stages: Dict[Tuple[str, str], List[Dict[str, float]]] = {}
    naive_sink = CountingSink()
    seq = 0
    for r in range(rounds + 1):  # round 0 warms up (allocations, XNNPACK packing) and is dropped
        for name, (seg, pipe, sink, it) in setups.items():
            in_idx = seg.model.input.index
            out_idx = seg.model.output.index
            for size, frame in frames.items():
                for kind in ("invoke", "ours", "naive"):
                    for _ in range(per_round):
                        t0 = time.perf_counter()
                        inner = None
                        if kind == "invoke":
                            seg.model.invoke()
                        elif kind == "ours":
                            seq += 1
                            invoke_at: List[float] = []  # invoke() start and end (the on_invoke hook)
                            timings = run_frame(seg, Frame(frame, seq, time.time(), time.monotonic(), "bench"),
                                                pipe, sink, on_invoke=lambda _: invoke_at.append(time.monotonic()))
                            inner = (invoke_at[1] - invoke_at[0]) * 1e3
                        else:
                            inner = naive_frame(it, in_idx, out_idx, seg.model.input_size, frame, naive_sink)
                        ms = (time.perf_counter() - t0) * 1e3
                        if r:
                            samples.setdefault((name, size, kind), []).append(ms)
                            if inner is not None:  # overhead = this frame's total - its own invoke
                                samples.setdefault((name, size, kind + "_overhead"), []).append(ms - inner)
                            if kind == "ours":
                                stages.setdefault((name, size), []).append(timings)
                    if kind == "ours":  # invoke-alone needs the input set: keep the real frame in
                        seg.model.set_frame(frame)
    rows = []
    for name in setups:
        for size in frames:
            inv = median(samples[(name, size, "invoke")])
            ours = median(samples[(name, size, "ours")])
            naive = median(samples[(name, size, "naive")])
            ours_over = median(samples[(name, size, "ours_overhead")])
            naive_over = median(samples[(name, size, "naive_overhead")])
            st = stages[(name, size)]
            per_stage = {k: round(median([t[k] for t in st if k in t]), 3)
                         for k in PIPELINE_STAGES if k not in ("capture", "queue", "end_to_end")}
            rows.append({
                "model": name, "size": size, "invoke_ms": round(inv, 2), "ours_ms": round(ours, 2),
                "naive_ms": round(naive, 2), "ours_ratio": round(ours / inv, 3),
                "naive_ratio": round(naive / inv, 3), "ours_overhead_ms": round(ours_over, 2),
                "naive_overhead_ms": round(naive_over, 2),
                "overhead_gain": round(naive_over / max(ours_over, 1e-3), 2),
                "ours_overhead_ratio": round(1 + ours_over / inv, 3),
                "stages_ms": per_stage, "n": len(samples[(name, size, "ours")]),
            })
    sizes = {k: round(median(v), 1) for k, v in setups["dm1.0"][2].bytes.items()}
    return {"threads": threads, "rows": rows, "payload_bytes_ours": sizes,
            "payload_bytes_naive_mask": round(median(naive_sink.bytes.get("mask", [0])), 1)}


# -- micro-measurements ------------------------------------------------------------------------

def timeit(fn: Callable[[], Any], n: int) -> float:
    fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return median(times)


def measure_png(frames: Dict[str, Any], n: int) -> List[Dict[str, Any]]:
    """Mask PNG size vs time: compression levels 0-3 x filter/strategy, model and frame size."""
    import cv2
    import numpy as np
    from edge_agent.inference import postprocess
    from edge_agent.inference.segmenter import Segmenter

    seg = Segmenter(str(MODEL_FILES["dm0.5"]))
    result = seg.segment(frames["1920x1080"])
    masks = {"model 513x289": np.ascontiguousarray(result.model_mask), "frame 1920x1080": result.mask}
    variants = {
        "all filters, default (OpenCV default)": (cv2.IMWRITE_PNG_ALL_FILTERS, cv2.IMWRITE_PNG_STRATEGY_DEFAULT),
        "filter none, default": (cv2.IMWRITE_PNG_FILTER_NONE, cv2.IMWRITE_PNG_STRATEGY_DEFAULT),
        "filter up, RLE": (cv2.IMWRITE_PNG_FILTER_UP, cv2.IMWRITE_PNG_STRATEGY_RLE),
        "filter none, RLE (grey, agent before palette masks)": (cv2.IMWRITE_PNG_FILTER_NONE,
                                                                cv2.IMWRITE_PNG_STRATEGY_RLE),
    }
    from edge_agent.output.encode import encode_mask_png
    rows = []
    for mname, mask in masks.items():
        for level in range(4):
            for vname, (filt, strat) in variants.items():
                params = [cv2.IMWRITE_PNG_COMPRESSION, level, cv2.IMWRITE_PNG_FILTER, filt,
                          cv2.IMWRITE_PNG_STRATEGY, strat]
                ms = timeit(lambda: cv2.imencode(".png", mask, params), n)
                size = len(cv2.imencode(".png", mask, params)[1])
                rows.append({"mask": mname, "level": level, "variant": vname, "ms": round(ms, 3), "bytes": size})
            # The agent's palette PNG (own zlib writer, same filter/strategy): must stay as fast.
            ms = timeit(lambda: encode_mask_png(mask, level), n)
            rows.append({"mask": mname, "level": level, "variant": "palette, filter none, RLE (agent)",
                         "ms": round(ms, 3), "bytes": len(encode_mask_png(mask, level))})
    del postprocess
    return rows


def measure_resize(frames: Dict[str, Any], n: int) -> List[Dict[str, Any]]:
    import numpy as np
    from edge_agent.inference.preprocess import AREA, FAST, letterbox

    rows = []
    for size, frame in frames.items():
        canvas = np.empty((513, 513, 3), np.uint8)
        area = timeit(lambda: letterbox(frame, (513, 513), out=canvas, quality=AREA), n)
        fast = timeit(lambda: letterbox(frame, (513, 513), out=canvas, quality=FAST), n)
        rows.append({"size": size, "area_ms": round(area, 3), "fast_ms": round(fast, 3)})
    return rows


def measure_argmax(n: int) -> List[Dict[str, Any]]:
    """np.argmax vs a channel loop vs cv2.reduceArgMax on 513x513x21 logits (why np.argmax)."""
    import cv2
    import numpy as np

    def channel_loop(x):
        best = x[..., 0].copy()
        labels = np.zeros(best.shape, np.uint8)
        greater = np.empty(best.shape, bool)
        for c in range(1, x.shape[-1]):
            np.greater(x[..., c], best, out=greater)
            labels[greater] = c
            np.maximum(best, x[..., c], out=best)
        return labels

    rng = np.random.default_rng(0)
    rows = []
    for dtype in (np.float32, np.uint8):
        x = (rng.standard_normal((513, 513, 21)) * 40).astype(np.float32).astype(dtype)
        ref = np.argmax(x, -1).astype(np.uint8)
        cv = lambda: cv2.reduceArgMax(x.reshape(-1, 21), 1).reshape(513, 513).astype(np.uint8)
        assert (channel_loop(x) == ref).all() and (cv() == ref).all()
        rows.append({
            "dtype": np.dtype(dtype).name,
            "np_argmax_ms": round(timeit(lambda: np.argmax(x, -1).astype(np.uint8), n), 2),
            "channel_loop_ms": round(timeit(lambda: channel_loop(x), n), 2),
            "cv2_reduceArgMax_ms": round(timeit(cv, n), 2),
        })
    return rows


# -- runtimes (worker subprocesses) -------------------------------------------------------------

def worker_main(runtime: str) -> int:
    """``--worker RUNTIME``: read "model threads n" lines, answer with invoke times as JSON."""
    import numpy as np
    from edge_agent.inference.runtimes import create_interpreter

    loaded: Dict[Tuple[str, int], Any] = {}
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        model, threads, n = line.split()
        key = (model, int(threads))
        try:
            if key not in loaded:
                li = create_interpreter(model, runtime, int(threads))
                it = li.interpreter
                d = it.get_input_details()[0]
                it.set_tensor(d["index"], np.full(d["shape"], 128, d["dtype"]))
                it.invoke()  # warm-up
                loaded[key] = li
            it = loaded[key].interpreter
            times = []
            for _ in range(int(n)):
                t0 = time.perf_counter()
                it.invoke()
                times.append((time.perf_counter() - t0) * 1e3)
            print(json.dumps({"invoke_ms": times, "version": loaded[key].runtime_version}), flush=True)
        except Exception as exc:  # report, keep serving
            print(json.dumps({"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}), flush=True)
    return 0


class Worker:
    def __init__(self, runtime: str, python: Path) -> None:
        env = dict(os.environ, PYTHONPATH=str(REPO), TF_CPP_MIN_LOG_LEVEL="3")
        self.proc = subprocess.Popen([str(python), str(Path(__file__).resolve()), "--worker", runtime],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True, env=env, cwd=str(REPO))
        first = self.proc.stdout.readline()
        if not first:
            raise RuntimeError(f"{runtime} worker did not start")

    def run(self, model: Path, threads: int, n: int) -> Dict[str, Any]:
        self.proc.stdin.write(f"{model} {threads} {n}\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        return json.loads(line) if line else {"error": "worker died"}

    def close(self) -> None:
        try:
            self.proc.stdin.close()
            self.proc.wait(10)
        except Exception:
            self.proc.kill()


def measure_runtimes(rounds: int, n: int, threads: int) -> List[Dict[str, Any]]:
    workers: Dict[str, Worker] = {}
    skipped: Dict[str, str] = {}
    for name, python in RUNTIME_VENVS.items():
        if not python.exists():
            skipped[name] = f"{python.parent.parent.name} not found"
            continue
        try:
            workers[name] = Worker(name, python)
        except RuntimeError as exc:
            skipped[name] = str(exc)
    times: Dict[Tuple[str, str], List[float]] = {}
    versions: Dict[str, str] = {}
    errors: Dict[Tuple[str, str], str] = {}
    for _ in range(rounds):
        for model_name, path in MODEL_FILES.items():
            for name, worker in workers.items():
                # tflite-runtime 2.14 has no XNNPACK for these quantized ops on x86: ~10x slower
                count = max(2, n // 4) if name == "tflite-runtime" else n
                reply = worker.run(path, threads, count)
                if "error" in reply:
                    errors[(name, model_name)] = reply["error"]
                    continue
                versions[name] = reply["version"]
                times.setdefault((name, model_name), []).extend(reply["invoke_ms"])
    for worker in workers.values():
        worker.close()
    rows = []
    for model_name in MODEL_FILES:
        base = median(times.get(("litert", model_name), []))
        for name in RUNTIME_VENVS:
            vals = times.get((name, model_name), [])
            rows.append({
                "model": model_name, "runtime": name, "version": versions.get(name),
                "threads": threads, "invoke_ms": round(median(vals), 2) if vals else None,
                "vs_litert": round(median(vals) / base, 2) if vals and base == base else None,
                "n": len(vals), "note": skipped.get(name) or errors.get((name, model_name)),
            })
    return rows


# -- the real agent ------------------------------------------------------------------------------

def write_agent_config(path: Path, port: int, frames_dir: Path, model: Path, threads: int,
                       source: Optional[List[str]] = None, interpreters: int = 1) -> Path:
    source = source or ['kind = "folder"', f'uri = "{frames_dir}"']
    path.write_text("\n".join([
        "[agent]", 'device_id = "bench"', 'log_level = "warning"', f'state_dir = "{path.parent / "state"}"',
        "[source]", *source, "loop = true", "fps = 0.0",
        "[model]", f'path = "{model}"', f'labels = "{LABELS}"', f"threads = {threads}",
        f"interpreters = {interpreters}",
        "[mqtt]", 'host = "127.0.0.1"', f"port = {port}",
        "[publish]", 'timings = "interval"', "timings_interval_s = 2.0", "stats_interval_s = 5.0", "",
    ]))
    return path


def vm_hwm_mb(pid: int) -> Optional[float]:
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        return None
    return None


@contextlib.contextmanager
def agent_bench(prefix: str) -> Iterator[Tuple[Path, Any]]:
    """A scratch directory and a real mosquitto for agent runs (both gone afterwards)."""
    from edge_agent.comms.broker import EmbeddedBroker

    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        with EmbeddedBroker(prefer="mosquitto") as broker:
            yield tmp, broker
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def broker_pid(broker: Any) -> Optional[int]:
    """The mosquitto process id behind an EmbeddedBroker (for its CPU); None when not known."""
    return getattr(getattr(getattr(broker, "_impl", None), "_proc", None), "pid", None)


def stop_agent(proc: subprocess.Popen) -> bytes:
    """SIGTERM, a kill after 20 s; the agent's stderr."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=20)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.communicate()[1]


class Subscriber:
    """Records arrival time and size of every mask, and the agent's interval timings."""

    def __init__(self, port: int, topic: str) -> None:
        import paho.mqtt.client as mqtt

        self.masks: List[Tuple[float, int]] = []
        self.timings: List[Dict[str, Any]] = []
        self.results: List[int] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-{os.getpid()}")
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", port)
        self.client.subscribe(topic, qos=0)
        self.client.loop_start()

    def _on_message(self, client, userdata, msg) -> None:
        now = time.monotonic()
        with self._lock:
            if msg.topic.endswith("/mask"):
                self.masks.append((now, len(msg.payload)))
            elif msg.topic.endswith("/result"):
                self.results.append(len(msg.payload))
            elif msg.topic.endswith("/timings"):
                self.timings.append(json.loads(msg.payload))

    def reset(self) -> None:
        with self._lock:
            self.masks, self.timings, self.results = [], [], []

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


def make_frames_dir(root: Path, frames: Dict[str, Any]) -> Path:
    """A folder of 720p camera-like JPEG frames (the folder source decodes each one)."""
    import cv2

    folder = root / "frames"
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(("cat_720p.jpg", "kite_and_cold.jpg", "parrot.jpg", "pets.jpg")):
        img = read_rgb(IMAGES / name)
        img = cv2.resize(img, (1280, 720), interpolation=cv2.INTER_AREA)
        cv2.imwrite(str(folder / f"{i:02d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR))
    return folder


_STANDALONE: Dict[Tuple[Path, int], Any] = {}


def standalone_invoke(model: Path, threads: int, n: int) -> List[float]:
    """``invoke()`` alone in this process (the agent is not running meanwhile)."""
    from edge_agent.inference.segmenter import Segmenter

    seg = _STANDALONE.get((model, threads))
    if seg is None:
        seg = _STANDALONE[(model, threads)] = Segmenter(str(model), threads=threads)
        seg.model.set_frame(read_rgb(IMAGES / "cat_720p.jpg"))
        seg.model.invoke()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        seg.model.invoke()
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def proc_cpu_s(pid: Optional[int]) -> float:
    """utime + stime of a process (all its threads), seconds; 0 when it is gone."""
    if not pid:
        return 0.0
    try:
        with open(f"/proc/{pid}/stat") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def self_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def run_agent_once(port: int, sub: Subscriber, cfg: Path, window_s: float, warmup_s: float,
                   broker_pid: Optional[int] = None, code: Path = REPO,
                   pythonpath: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """One run of ``python -m edge_agent run`` (from the tree ``code``: this one, or an older
    revision's for a before/after comparison; ``pythonpath``: directories before it)."""
    sub.reset()
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([*pythonpath, str(code)]))
    t_start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "edge_agent", "run", "--config", str(cfg)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env, cwd=str(code))
    first = None
    deadline = t_start + 30
    while time.monotonic() < deadline and proc.poll() is None:
        if sub.masks:
            first = sub.masks[0][0] - t_start
            break
        time.sleep(0.005)
    hwm = None
    if first is not None:
        time.sleep(warmup_s)
        n0 = len(sub.masks)
        cpu0 = (proc_cpu_s(proc.pid), proc_cpu_s(broker_pid), self_cpu_s())
        t0 = time.monotonic()
        time.sleep(window_s)
        n1 = len(sub.masks)
        t1 = time.monotonic()
        cpu1 = (proc_cpu_s(proc.pid), proc_cpu_s(broker_pid), self_cpu_s())
        hwm = vm_hwm_mb(proc.pid)
        fps = (n1 - n0) / (t1 - t0)
        per_mask = [round((b - a) * 1e3 / max(n1 - n0, 1), 2) for a, b in zip(cpu0, cpu1)]
    else:
        fps = 0.0
        per_mask = [None, None, None]
    err = stop_agent(proc)
    agent_inf = [t["stages"]["inference"]["mean"] for t in sub.timings if "inference" in t.get("stages", {})]
    masks = [b for _, b in sub.masks]
    return {
        "fps": fps, "first_mask_s": first, "peak_rss_mb": hwm,
        "mask_bytes": median(masks) if masks else None,
        "result_bytes": median(sub.results) if sub.results else None,
        "agent_inference_ms": median(agent_inf) if agent_inf else None,
        "agent_cpu_ms_per_mask": per_mask[0], "broker_cpu_ms_per_mask": per_mask[1],
        "subscriber_cpu_ms_per_mask": per_mask[2],
        "stderr_tail": err.decode(errors="replace")[-300:] if first is None else "",
    }


def measure_agent(frames: Dict[str, Any], rounds: int, window_s: float, models: List[str]) -> List[Dict[str, Any]]:
    out: Dict[Tuple[str, int], List[Dict[str, Any]]] = {}
    invokes: Dict[Tuple[str, int], List[float]] = {}
    with agent_bench("edge-agent-bench-") as (tmp, broker), \
            contextlib.closing(Subscriber(broker.port, "edge-agent/bench/#")) as sub:
        folder = make_frames_dir(tmp, frames)
        for _ in range(rounds):
            for model_name in models:
                for threads in (1, 2):
                    path = MODEL_FILES[model_name]
                    # invoke alone just before and just after the agent's run: same drift
                    invokes.setdefault((model_name, threads), []).extend(standalone_invoke(path, threads, 8))
                    cfg = write_agent_config(tmp / f"agent-{threads}.toml", broker.port, folder, path, threads)
                    res = run_agent_once(broker.port, sub, cfg, window_s, warmup_s=1.5)
                    invokes[(model_name, threads)].extend(standalone_invoke(path, threads, 8))
                    log(f"  agent {model_name} threads={threads}: {res['fps']:.2f} masks/s, "
                        f"first mask {res['first_mask_s']}, rss {res['peak_rss_mb']}")
                    out.setdefault((model_name, threads), []).append(res)
    rows = []
    for (model_name, threads), runs in out.items():
        inv = median(invokes[(model_name, threads)])
        fps = median([r["fps"] for r in runs])
        agent_inf = [r["agent_inference_ms"] for r in runs if r["agent_inference_ms"]]
        rows.append({
            "model": model_name, "threads": threads, "fps": round(fps, 2),
            "invoke_ms": round(inv, 2), "throughput_ratio": round(fps * inv / 1e3, 3),
            "agent_inference_ms": round(median(agent_inf), 2) if agent_inf else None,
            "first_mask_s": round(max(r["first_mask_s"] or 99 for r in runs), 2),
            "peak_rss_mb": round(max(r["peak_rss_mb"] or 0 for r in runs), 1),
            "mask_bytes": runs[-1]["mask_bytes"], "result_bytes": runs[-1]["result_bytes"],
            "errors": [r["stderr_tail"] for r in runs if r["stderr_tail"]],
        })
    return rows


# -- throughput on every source, with the CPU limit model ----------------------------------------------

def crop_16_9(img):
    h, w = img.shape[:2]
    if w * 9 >= h * 16:
        nw = h * 16 // 9
        return img[:, (w - nw) // 2:(w - nw) // 2 + nw]
    nh = w * 9 // 16
    return img[(h - nh) // 2:(h - nh) // 2 + nh]


PHOTOS = ("cat_1080p.jpg", "kite_and_cold.jpg", "parrot.jpg", "pets.jpg")


def make_sources(root: Path) -> Dict[str, List[str]]:
    """The [source] lines of each throughput source: JPEG folders (1080p, 720p: 16:9 crops of the
    photos in ../shared/test_data/images, JPEG quality 90), an MJPG AVI at 1080p, the synthetic
    pattern at 1280x720 (raw frames: no decode)."""
    import cv2
    import numpy as np

    frames = {}
    for height in (1080, 720):
        folder = root / f"jpeg-{height}p"
        folder.mkdir(exist_ok=True)
        for i, name in enumerate(PHOTOS):
            img = crop_16_9(read_rgb(IMAGES / name))
            interp = cv2.INTER_AREA if img.shape[0] > height else cv2.INTER_CUBIC
            img = cv2.resize(img, (height * 16 // 9, height), interpolation=interp)
            frames.setdefault(height, []).append(img)
            cv2.imwrite(str(folder / f"{i:02d}.jpg"), cv2.cvtColor(img, cv2.COLOR_RGB2BGR),
                        [cv2.IMWRITE_JPEG_QUALITY, 90])
    video = root / "mjpg-1080p.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 30, (1920, 1080))
    for i in range(60):  # 2 s of 1080p MJPEG: the photos, each panned a little per frame
        img = frames[1080][(i // 15) % len(PHOTOS)]
        writer.write(cv2.cvtColor(np.roll(img, 8 * (i % 15), axis=1), cv2.COLOR_RGB2BGR))
    writer.release()
    return {
        "jpeg-1080p": ['kind = "folder"', f'uri = "{root / "jpeg-1080p"}"'],
        "jpeg-720p": ['kind = "folder"', f'uri = "{root / "jpeg-720p"}"'],
        "mjpg-1080p": ['kind = "opencv"', f'uri = "{video}"'],
        "raw-720p": ['kind = "synthetic"', "width = 1280", "height = 720"],
    }


def source_settings(lines: List[str]) -> Dict[str, Any]:
    """The [source] lines back as a dict (tomllib), for building the same source in-process."""
    import tomllib

    return dict(tomllib.loads("\n".join(lines)), loop=True, fps=0.0)


class MqttSink:
    """The stage functions' sink on a real paho client (QoS 0, like the agent's masks)."""

    def __init__(self, port: int) -> None:
        import paho.mqtt.client as mqtt

        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"bench-stages-{os.getpid()}")
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()

    def publish(self, suffix: str, payload: Any, qos: Optional[int] = None, retain: bool = False) -> bool:
        return self.client.publish(f"edge-agent/bench-stages/{suffix}", payload, qos=0).rc == 0

    def close(self) -> None:
        self.client.loop_stop()
        self.client.disconnect()


CPU_STAGES = ("decode", "preprocess", "set_input", "label_map", "postprocess", "encode", "publish")


def stage_cpu(seg, settings: Dict[str, Any], sink: MqttSink, n: int, reduced: bool = True,
              keep: Optional[List[Any]] = None) -> Dict[str, Any]:
    """CPU ms per stage (``time.thread_time`` on this thread) of the daemon's per-frame path on a
    real source, the pipeline's reduced decode (``reduced=False``: full-size decode, as before)
    and reused buffers included; invoke's wall ms. ``keep``: gets each frame's frame-size mask."""
    from edge_agent.output import stages
    from edge_agent.inference import postprocess as post
    from edge_agent.daemon.pipeline import decode_hint
    from edge_agent.output.stages import EncodeOptions, FrameOutput
    from edge_agent.sources import build_source

    source = build_source(settings)
    source.open()
    source.set_decode_hint(decode_hint(seg) if reduced else None)
    model = seg.model
    inp, labels = model.new_input_buffer(), model.new_label_buffer()
    output = FrameOutput()
    opts = EncodeOptions()
    cpu: Dict[str, List[float]] = {k: [] for k in CPU_STAGES}
    invoke_ms: List[float] = []
    decoded = None
    last_mask = None
    try:
        for i in range(n + 3):  # 3 warm-up frames
            t = [time.thread_time()]
            frame = source.read(timeout=5.0)
            t.append(time.thread_time())
            _, geometry = stages.prepare(model, frame.image, seg.mode, frame_hw=frame.size, out=inp)
            t.append(time.thread_time())
            model.set_input(inp)
            t.append(time.thread_time())
            w0 = time.perf_counter()
            model.invoke()
            w1 = time.perf_counter()
            t.append(time.thread_time())
            label_map = model.label_map(labels)
            t.append(time.thread_time())
            masks = stages.postprocess(label_map, geometry, seg.labels, False, fractions=True)
            t.append(time.thread_time())
            messages, last_mask = stages.encode(frame, masks, model.file.sha256, opts, last_mask)
            t.append(time.thread_time())
            stages.publish(sink, messages)
            t.append(time.thread_time())
            if i >= 3 and keep is not None:  # outside the timed stages
                keep.append(post.to_frame(label_map, geometry))
            if i >= 3:
                d = [(b - a) * 1e3 for a, b in zip(t, t[1:])]
                for k, v in zip(("decode", "preprocess", "set_input"), d[:3]):
                    cpu[k].append(v)
                for k, v in zip(("label_map", "postprocess", "encode", "publish"), d[4:]):
                    cpu[k].append(v)
                invoke_ms.append((w1 - w0) * 1e3)
            decoded = (frame.image.shape[1], frame.image.shape[0], frame.width, frame.height)
    finally:
        source.close()
    del output
    per = {k: round(median(v), 3) for k, v in cpu.items()}
    return {"stage_cpu_ms": per, "other_cpu_ms": round(sum(per.values()), 2),
            "invoke_in_loop_ms": round(median(invoke_ms), 2),
            "decoded": f"{decoded[0]}x{decoded[1]} of {decoded[2]}x{decoded[3]}" if decoded else None}


def standalone_invoke_cpu(model: Path, threads: int, n: int) -> Tuple[List[float], float]:
    """``invoke()`` alone: wall ms of each, and the process CPU ms per invoke (all its threads)."""
    c0 = self_cpu_s()
    wall = standalone_invoke(model, threads, n)
    return wall, (self_cpu_s() - c0) * 1e3 / n


def export_revision(rev: str, root: Path) -> Path:
    """``git archive`` of ``rev`` into ``root/rev`` (the agent as it was, for --compare-with)."""
    dest = root / f"rev-{rev}"
    dest.mkdir()
    archive = subprocess.run(["git", "-C", str(REPO), "archive", rev], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive, check=True)
    return dest


def layouts_for(cores: int, spec: str) -> List[Tuple[int, int]]:
    """(interpreters, threads) pairs that use every core: "1xN" (one interpreter, N threads: the
    lowest latency) and "Nx1" (N interpreters side by side, one thread each)."""
    out = []
    for item in spec.split(","):
        item = item.strip().replace("N", str(cores))
        if item:
            a, b = (int(x) for x in item.split("x"))
            out.append((a, b))
    return out


def measure_throughput(rounds: int, window_s: float, model_name: str = "dm1.0",
                       only: Optional[List[str]] = None, compare_with: str = "",
                       layouts: str = "1xN,Nx1") -> List[Dict[str, Any]]:
    """The daemon on each source, all cores; ratio measured vs the limit model (module doc), for
    each interpreters x threads layout, always against ``invoke()`` alone on all cores.
    ``compare_with``: also run the agent of that git revision, interleaved (ratio, CPU ratio)."""
    from edge_agent.inference.segmenter import Segmenter

    cores = os.cpu_count() or 1
    path = MODEL_FILES[model_name]
    runs: Dict[str, List[Dict[str, Any]]] = {}
    with agent_bench("edge-agent-bench-tp-") as (tmp, broker), \
            contextlib.closing(Subscriber(broker.port, "edge-agent/bench/#")) as sub, \
            contextlib.closing(MqttSink(broker.port)) as sink:
        sources = make_sources(tmp)
        if only:
            sources = {k: v for k, v in sources.items() if k in only}
        old_code = export_revision(compare_with, tmp) if compare_with else None
        mosquitto_pid = broker_pid(broker)
        seg = Segmenter(str(path), labels=str(LABELS), threads=cores)
        for r in range(rounds):
            for (name, lines), (interpreters, threads) in itertools.product(
                    sources.items(), layouts_for(cores, layouts)):
                layout = f"{interpreters}x{threads}"
                load = os.getloadavg()[0]
                inv, cpu_a = standalone_invoke_cpu(path, cores, 8)
                cfg = write_agent_config(tmp / f"agent-{name}.toml", broker.port, tmp, path, threads, lines,
                                         interpreters=interpreters)
                res = run_agent_once(broker.port, sub, cfg, window_s, warmup_s=2.0, broker_pid=mosquitto_pid)
                if old_code is not None:
                    old = run_agent_once(broker.port, sub, cfg, window_s, warmup_s=2.0,
                                         broker_pid=mosquitto_pid, code=old_code)
                inv_b, cpu_b = standalone_invoke_cpu(path, cores, 8)
                inv += inv_b
                reduced_masks: List[Any] = []
                full_masks: List[Any] = []
                st = stage_cpu(seg, source_settings(lines), sink, 12, keep=reduced_masks)
                full = stage_cpu(seg, source_settings(lines), sink, 12, reduced=False, keep=full_masks)
                # masks of the same frames, reduced vs full-size decode: share of pixels that differ
                diffs = [float((a != b).mean()) * 100 for a, b in zip(reduced_masks, full_masks)]
                res.update(st, invoke_ms=median(inv), load=round(load, 2), round=r, layout=layout,
                           invoke_cpu_ms=round((cpu_a + cpu_b) / 2, 2),
                           other_cpu_full_decode_ms=full["other_cpu_ms"],
                           mask_diff_pct=round(statistics.fmean(diffs), 3) if diffs else None)
                # Load-robust proxy: invoke's CPU over the agent's CPU per mask (both all threads).
                res["cpu_ratio"] = (round(res["invoke_cpu_ms"] / res["agent_cpu_ms_per_mask"], 3)
                                    if res["agent_cpu_ms_per_mask"] else None)
                res["ratio"] = round(res["fps"] * res["invoke_ms"] / 1e3, 3)
                if old_code is not None:
                    res["before_ratio"] = round(old["fps"] * res["invoke_ms"] / 1e3, 3)
                    res["before_cpu_ratio"] = (round(res["invoke_cpu_ms"] / old["agent_cpu_ms_per_mask"], 3)
                                               if old["agent_cpu_ms_per_mask"] else None)
                res["limit"] = round(res["invoke_ms"] / (res["invoke_ms"] + st["other_cpu_ms"] / cores), 3)
                res["limit_full_decode"] = round(
                    res["invoke_ms"] / (res["invoke_ms"] + full["other_cpu_ms"] / cores), 3)
                harness = (res["broker_cpu_ms_per_mask"] or 0) + (res["subscriber_cpu_ms_per_mask"] or 0)
                res["limit_with_harness"] = round(
                    res["invoke_ms"] / (res["invoke_ms"] + (st["other_cpu_ms"] + harness) / cores), 3)
                log(f"  {name} {layout} round {r}: {res['fps']:.2f} masks/s, invoke {res['invoke_ms']:.2f} ms, "
                    f"ratio {res['ratio']} (limit {res['limit']}, with broker+subscriber "
                    f"{res['limit_with_harness']}), CPU ratio {res['cpu_ratio']}, "
                    + (f"before ({compare_with}): ratio {res['before_ratio']} CPU ratio {res['before_cpu_ratio']}, "
                       if old_code is not None else "") +
                    f"other CPU {st['other_cpu_ms']} ms {st['stage_cpu_ms']} (full decode {full['other_cpu_ms']}), "
                    f"decoded {st['decoded']}, masks differ from full decode {res['mask_diff_pct']}%, "
                    f"load {load:.2f}")
                runs.setdefault((name, layout), []).append(res)
    rows = []
    for (name, layout), rs in runs.items():
        def med(key):
            vals = [x[key] for x in rs if x.get(key) is not None]
            return round(median(vals), 3) if vals else None
        rows.append({
            "source": name, "model": model_name, "threads": cores, "layout": layout, "rounds": len(rs),
            "mask_diff_pct": med("mask_diff_pct"),
            "fps": med("fps"), "invoke_ms": med("invoke_ms"), "ratio": med("ratio"),
            "ratios": [x["ratio"] for x in rs], "limit": med("limit"), "limit_with_harness": med("limit_with_harness"),
            "other_cpu_ms": med("other_cpu_ms"), "other_cpu_full_decode_ms": med("other_cpu_full_decode_ms"),
            "limit_full_decode": med("limit_full_decode"), "invoke_cpu_ms": med("invoke_cpu_ms"),
            "cpu_ratio": med("cpu_ratio"), "cpu_ratios": [x["cpu_ratio"] for x in rs],
            "before_ratio": med("before_ratio"), "before_cpu_ratio": med("before_cpu_ratio"),
            "stage_cpu_ms": {k: round(median([x["stage_cpu_ms"][k] for x in rs]), 3) for k in CPU_STAGES},
            "agent_cpu_ms_per_mask": med("agent_cpu_ms_per_mask"),
            "broker_cpu_ms_per_mask": med("broker_cpu_ms_per_mask"),
            "subscriber_cpu_ms_per_mask": med("subscriber_cpu_ms_per_mask"),
            "agent_inference_ms": med("agent_inference_ms"), "peak_rss_mb": med("peak_rss_mb"),
            "decoded": rs[-1]["decoded"],
            "load": [x["load"] for x in rs],
            "errors": [x["stderr_tail"] for x in rs if x["stderr_tail"]],
        })
    return rows


def measure_parallelism(n: int) -> Dict[str, Any]:
    """Is the second core really a second core? invoke() (1 thread) alone vs beside a busy loop.

    A pipelined agent can only hide capture/decode/postprocessing behind inference if another
    core runs them at the same time. ``efficiency`` 1.0 = an independent core; 0.5 = the two
    vCPUs share one physical core (a busy loop beside invoke() doubles it), so every per-frame
    cost outside invoke() adds to the frame period and throughput ~ invoke / (invoke + other).
    """
    model = MODELS / "deeplabv3_mnv2_dm05_pascal_quant.tflite"
    standalone_invoke(model, 1, 3)
    alone = median(standalone_invoke(model, 1, n))
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(0.5)
        loaded = median(standalone_invoke(model, 1, n))
    finally:
        busy.kill()
        busy.wait()
    return {"invoke_alone_ms": round(alone, 2), "invoke_beside_busy_core_ms": round(loaded, 2),
            "efficiency": round(alone / loaded, 3)}


# -- report ----------------------------------------------------------------------------------------

def machine() -> Dict[str, Any]:
    from edge_agent.system import host_info

    import cv2
    import numpy as np

    info = host_info()
    info.update(numpy=np.__version__, opencv=cv2.__version__)
    try:
        import ai_edge_litert

        info["ai_edge_litert"] = getattr(ai_edge_litert, "__version__", "?")
    except ImportError:
        pass
    try:
        info["loadavg_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def ok(value: Optional[float], target: float, higher: bool = False) -> str:
    if value is None:
        return "n/a"
    good = value >= target if higher else value <= target
    return "yes" if good else "**no**"


def markdown(doc: Dict[str, Any]) -> str:
    m = doc["machine"]
    lines = [f"# edge-agent performance ({m['machine']}, {m['cpu_count']} cores, {m['board']})", ""]
    lines.append(f"python {m['python']}, numpy {m['numpy']}, OpenCV {m['opencv']}, "
                 f"ai-edge-litert {m.get('ai_edge_litert', '?')}; load at start {m.get('loadavg_at_start')}")
    par = doc.get("parallelism")
    if par:
        lines += ["", f"Core independence: invoke() with 1 thread {par['invoke_alone_ms']} ms alone, "
                  f"{par['invoke_beside_busy_core_ms']} ms while a busy loop runs on another core "
                  f"(efficiency {par['efficiency']}; 1.0 = independent cores, 0.5 = one shared core)."]
    lat = doc.get("latency")
    if lat:
        lines += ["", f"## Per-frame latency (interpreter threads {lat['threads']}, medians, ms)", "",
                  "overhead = a frame's total minus its own invoke (so invoke jitter cancels); "
                  "(invoke + overhead)/invoke is the same ratio without that jitter.", "",
                  "| model | frame | invoke | ours | ours/invoke | (invoke+overhead)/invoke | naive | naive/invoke | overhead ours | overhead naive | overhead naive/ours |",
                  "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in lat["rows"]:
            lines.append(f"| {r['model']} | {r['size']} | {r['invoke_ms']} | {r['ours_ms']} | **{r['ours_ratio']}** | {r['ours_overhead_ratio']} | "
                         f"{r['naive_ms']} | {r['naive_ratio']} | {r['ours_overhead_ms']} | {r['naive_overhead_ms']} | "
                         f"{r['overhead_gain']}x |")
        lines += ["", "Ours by stage (ms): " + "; ".join(
            f"{r['model']} {r['size']}: " + ", ".join(f"{k} {v}" for k, v in r["stages_ms"].items())
            for r in lat["rows"] if r["model"] == "dm1.0")]
        lines += ["", f"Mask payload ours {lat['payload_bytes_ours'].get('mask')} B (model resolution), "
                  f"naive {lat['payload_bytes_naive_mask']} B (full-resolution PIL PNG)."]
    agent = doc.get("agent")
    if agent:
        lines += ["", "## The real agent (subprocess, folder of 720p JPEGs, mosquitto)", "",
                  "| model | threads | masks/s | invoke alone ms | throughput x invoke | agent's own inference ms | first mask s | peak RSS MB | bytes/mask | bytes/result |",
                  "|---|---|---|---|---|---|---|---|---|---|"]
        for r in agent:
            lines.append(f"| {r['model']} | {r['threads']} | {r['fps']} | {r['invoke_ms']} | **{r['throughput_ratio']}** | "
                         f"{r['agent_inference_ms']} | {r['first_mask_s']} | {r['peak_rss_mb']} | {r['mask_bytes']} | {r['result_bytes']} |")
    tp = doc.get("throughput")
    if tp:
        lines += ["", f"## Throughput on every source ({tp[0]['model']}, all {tp[0]['threads']} cores)", "",
                  "layout = interpreters x threads each (model.interpreters x model.threads): 1xN is one interpreter "
                  "on every core (lowest latency), Nx1 runs N frames side by side. "
                  "ratio = masks/s x invoke() alone on all cores (interleaved); limit = invoke / (invoke + other CPU / cores), "
                  "other CPU = CPU ms (thread time) of every stage but invoke; 'with harness' adds mosquitto's and the "
                  "subscriber's CPU per mask (on this machine, not on a device's); full decode = the same with the "
                  "frame decoded at full size (before reduced decoding). CPU ratio = invoke()'s process CPU alone / "
                  "the agent's process CPU per mask: a proxy of the ratio that the machine's load disturbs less. "
                  "mask diff = share of frame-size mask pixels that differ between reduced and full-size decoding of "
                  "the same frames (mean, %).", "",
                  "| source | layout | decoded | mask diff % | agent's inference ms (latency) | peak RSS MB | masks/s | invoke ms | **ratio** (rounds) | limit | limit with harness | other CPU ms | full decode: other CPU ms / limit | CPU ratio | agent CPU ms/mask | invoke CPU ms | broker + sub CPU ms/mask | load 1 min |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in tp:
            lines.append(f"| {r['source']} | {r['layout']} | {r['decoded']} | {r['mask_diff_pct']} | {r['agent_inference_ms']} | {r['peak_rss_mb']} | {r['fps']} | {r['invoke_ms']} | **{r['ratio']}** ({', '.join(map(str, r['ratios']))}) | "
                         f"{r['limit']} | {r['limit_with_harness']} | {r['other_cpu_ms']} | {r['other_cpu_full_decode_ms']} / {r['limit_full_decode']} | "
                         f"{r['cpu_ratio']} | {r['agent_cpu_ms_per_mask']} | {r['invoke_cpu_ms']} | "
                         f"{r['broker_cpu_ms_per_mask']} + {r['subscriber_cpu_ms_per_mask']} | {', '.join(map(str, r['load']))} |")
        if any(r.get("before_ratio") is not None for r in tp):
            lines += ["", "Before/after (the agent of `--compare-with`, interleaved in the same rounds): " + "; ".join(
                f"{r['source']} {r['layout']}: ratio {r['before_ratio']} -> {r['ratio']}, CPU ratio {r['before_cpu_ratio']} -> {r['cpu_ratio']}"
                for r in tp)]
        lines += ["", "Other CPU by stage (ms): " + "; ".join(
            f"{r['source']}: " + ", ".join(f"{k} {v}" for k, v in r["stage_cpu_ms"].items())
            for r in tp if r["layout"] == tp[0]["layout"])]
    rt = doc.get("runtimes")
    if rt:
        lines += ["", f"## Runtimes (invoke, medians, threads {rt[0]['threads']})", "",
                  "| model | runtime | version | invoke ms | vs litert | n | note |", "|---|---|---|---|---|---|---|"]
        for r in rt:
            lines.append(f"| {r['model']} | {r['runtime']} | {r['version']} | {r['invoke_ms']} | {r['vs_litert']} | {r['n']} | {r['note'] or ''} |")
    if doc.get("resize"):
        lines += ["", "## Letterbox to 513x513 (ms)", "", "| frame | INTER_AREA | fast (2x area halving + linear) |", "|---|---|---|"]
        lines += [f"| {r['size']} | {r['area_ms']} | {r['fast_ms']} |" for r in doc["resize"]]
    if doc.get("png"):
        lines += ["", "## Mask PNG (ms / bytes)", "", "| mask | level | variant | ms | bytes |", "|---|---|---|---|---|"]
        lines += [f"| {r['mask']} | {r['level']} | {r['variant']} | {r['ms']} | {r['bytes']} |" for r in doc["png"]]
    if doc.get("argmax"):
        lines += ["", "## Argmax over 513x513x21 logits (ms)", "", "| dtype | np.argmax | channel loop | cv2.reduceArgMax |", "|---|---|---|---|"]
        lines += [f"| {r['dtype']} | {r['np_argmax_ms']} | {r['channel_loop_ms']} | {r['cv2_reduceArgMax_ms']} |" for r in doc["argmax"]]
    t = doc.get("targets")
    if t:
        lines += ["", "## Targets", "", "| target | measured | met |", "|---|---|---|"]
        lines += [f"| {k} | {v['measured']} | {v['met']} |" for k, v in t.items()]
    return "\n".join(lines) + "\n"


def targets(doc: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    out: Dict[str, Dict[str, Any]] = {}
    lat = {(r["model"], r["size"]): r for r in doc.get("latency", {}).get("rows", [])}
    for model in MODEL_FILES:
        for size, key, limit in (("640x480", "latency_640x480", 1.10), ("1920x1080", "latency_1920x1080", 1.25)):
            r = lat.get((model, size))
            if r:
                out[f"latency/invoke {size} {model} <= {limit}"] = {"measured": r["ours_ratio"], "met": ok(r["ours_ratio"], limit)}
        r = lat.get((model, "1920x1080"))
        if r:
            out[f"overhead naive/ours 1080p {model} >= 2"] = {"measured": r["overhead_gain"], "met": ok(r["overhead_gain"], 2.0, True)}
    for r in doc.get("throughput", []):
        goal = {"jpeg-1080p": 0.93, "raw-720p": 0.95}.get(r["source"])
        if goal:
            out[f"throughput x invoke {r['source']} {r['layout']} >= {goal}"] = {
                "measured": r["ratio"], "met": ok(r["ratio"], goal, True)}
            if r.get("mask_diff_pct") is not None and r["source"].startswith("jpeg"):
                out[f"masks vs full decode {r['source']} {r['layout']} <= 0.5 %"] = {
                    "measured": r["mask_diff_pct"], "met": ok(r["mask_diff_pct"], 0.5)}
    for r in doc.get("agent", []):
        tag = f"{r['model']} threads={r['threads']}"
        out[f"throughput x invoke {tag} >= 0.90"] = {"measured": r["throughput_ratio"], "met": ok(r["throughput_ratio"], 0.90, True)}
        if r["model"] == "dm1.0":
            out[f"peak RSS MB {tag} <= 150"] = {"measured": r["peak_rss_mb"], "met": ok(r["peak_rss_mb"], 150.0)}
        out[f"first mask s {tag} <= 3"] = {"measured": r["first_mask_s"], "met": ok(r["first_mask_s"], 3.0)}
    return out


def plot(doc: Dict[str, Any], path: Path) -> Optional[str]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    rows = doc.get("latency", {}).get("rows", [])
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    labels = [f"{r['model']}\n{r['size']}" for r in rows]
    x = range(len(rows))
    ax = axes[0]
    ax.bar([i - 0.2 for i in x], [r["invoke_ms"] for r in rows], 0.4, label="invoke", color="#888")
    ax.bar([i - 0.2 for i in x], [max(0, r["ours_overhead_ms"]) for r in rows], 0.4,
           bottom=[r["invoke_ms"] for r in rows], label="overhead ours", color="#2a7")
    ax.bar([i + 0.2 for i in x], [r["invoke_ms"] for r in rows], 0.4, color="#888")
    ax.bar([i + 0.2 for i in x], [max(0, r["naive_overhead_ms"]) for r in rows], 0.4,
           bottom=[r["invoke_ms"] for r in rows], label="overhead naive", color="#d54")
    ax.set_xticks(list(x))
    ax.set_xticklabels(labels, fontsize=8)
    ax.set_ylabel("ms per frame (left ours, right naive)")
    ax.set_title("Per-frame latency")
    ax.legend(fontsize=8)
    ax = axes[1]
    agent = doc.get("agent", [])
    if agent:
        names = [f"{r['model']}\nthreads {r['threads']}" for r in agent]
        ax.bar(range(len(agent)), [r["throughput_ratio"] for r in agent], color="#37a")
        ax.axhline(0.9, color="k", ls="--", lw=1, label="target 0.90")
        ax.set_xticks(range(len(agent)))
        ax.set_xticklabels(names, fontsize=8)
        ax.set_ylabel("masks/s x invoke time")
        ax.set_title("Pipelined throughput of the agent vs 1/invoke")
        ax.legend(fontsize=8)
    m = doc["machine"]
    fig.suptitle(f"edge-agent on {m['machine']} ({m['cpu_count']} cores)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer rounds (~2 min instead of ~6)")
    p.add_argument("--out", default=str(REPO / "bench" / "results"), help="directory for perf.json and perf.png")
    p.add_argument("--threads", type=int, default=0, help="interpreter threads for the latency part (0 = CPUs)")
    p.add_argument("--only", default="latency,agent,throughput,runtimes,micro",
                   help="comma-separated parts: latency, agent, throughput, runtimes, micro")
    p.add_argument("--rounds", type=int, default=0, help="throughput rounds (default 1 quick, 3 full)")
    p.add_argument("--window", type=float, default=0.0, help="throughput window per run, s (default 6 quick, 12)")
    p.add_argument("--compare-with", default="", help="throughput: also run the agent of this git revision, interleaved")
    p.add_argument("--layouts", default="1xN,Nx1",
                   help="throughput: interpreters x threads layouts, N = cores (default 1xN,Nx1)")
    p.add_argument("--sources", default="", help="throughput sources (default all: jpeg-1080p,jpeg-720p,mjpg-1080p,raw-720p)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        return worker_main(args.worker)
    try:
        import PIL  # noqa: F401
    except ImportError:
        raise SystemExit("bench dependency missing: .venv/bin/pip install pillow matplotlib")
    parts = set(args.only.split(","))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    quick = args.quick
    threads = args.threads or (os.cpu_count() or 1)
    frames = bench_frames()
    doc: Dict[str, Any] = {"machine": machine(), "quick": quick, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    t0 = time.monotonic()
    log("parallelism: invoke alone vs beside a busy core ...")
    doc["parallelism"] = measure_parallelism(15 if quick else 40)
    if "latency" in parts:
        log("latency: interleaved rounds of invoke / ours / naive ...")
        doc["latency"] = measure_latency(frames, rounds=2 if quick else 4, per_round=3 if quick else 5, threads=threads)
    if "micro" in parts:
        log("micro: resize, png, argmax ...")
        n = 5 if quick else 15
        doc["resize"] = measure_resize(frames, n)
        doc["png"] = measure_png(frames, n)
        doc["argmax"] = measure_argmax(3 if quick else 7)
    if "throughput" in parts:
        log("throughput: the daemon on every source, all cores ...")
        doc["throughput"] = measure_throughput(rounds=args.rounds or (1 if quick else 3),
                                               window_s=args.window or (6.0 if quick else 12.0),
                                               only=[x for x in args.sources.split(",") if x] or None,
                                               compare_with=args.compare_with, layouts=args.layouts)
    if "runtimes" in parts:
        log("runtimes: worker subprocesses ...")
        doc["runtimes"] = measure_runtimes(rounds=1 if quick else 2, n=4 if quick else 8, threads=threads)
    if "agent" in parts:
        log("agent: subprocess + mosquitto ...")
        doc["agent"] = measure_agent(frames, rounds=1 if quick else 2, window_s=6.0 if quick else 12.0,
                                     models=["dm1.0"] if quick else ["dm1.0", "dm0.5"])
    doc["targets"] = targets(doc)
    doc["elapsed_s"] = round(time.monotonic() - t0, 1)
    (out / "perf.json").write_text(json.dumps(doc, indent=2))
    problem = plot(doc, out / "perf.png")
    text = markdown(doc)
    (out / "perf.md").write_text(text)
    print(text)
    log(f"wrote {out / 'perf.json'}, {out / 'perf.md'}" + ("" if problem else f", {out / 'perf.png'}")
        + (f" ({problem})" if problem else "") + f" in {doc['elapsed_s']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
