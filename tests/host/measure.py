"""Measurements shared by the host tests and tools/host/per_tensor_table.sh: mIoU on the shared
VOC pairs and interleaved invoke times (not a test module: test modules never import each other)."""

import numpy as np

from edge_agent.inference.segmenter import Segmenter
from tests.host.host_data import VOC
from tools.host import metrics
from tools.host.datasets import VocDataset


def miou(predict) -> float:
    conf = np.zeros((21, 21), np.int64)
    for _, image, label in VocDataset(VOC):
        conf += metrics.confusion(predict(image), label, 21)
    return metrics.mean_iou(conf)


def segmenter_miou(path) -> float:
    seg = Segmenter(str(path), runtime="auto")
    return miou(lambda image: seg.segment(image).mask)


def interleaved_invoke_ms(paths, image, threads: int, runs: int = 30):
    """Median invoke per model, the models alternating run by run (load drifts hit all alike)."""
    segs = [Segmenter(str(p), runtime="auto", threads=threads) for p in paths]
    for seg in segs:
        for _ in range(3):
            seg.segment(image)
    times = [[] for _ in segs]
    for run in range(runs):
        order = range(len(segs)) if run % 2 == 0 else reversed(range(len(segs)))
        for i in order:
            times[i].append(segs[i].segment(image).timings["inference"])
    return [float(np.median(t)) for t in times], segs[0].describe_runtime()
