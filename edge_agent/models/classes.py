"""Which of a model's classes a camera watches: the one rule the agent's ``info`` (per camera
``watched``), the Home Assistant entities and so the console all follow.

Configured names (a camera's ``classes``, else ``[homeassistant] classes``) match the labels
spelling-insensitively; with none configured, up to :data:`DEFAULT_CLASS_COUNT` of
:data:`PREFERRED_CLASSES` the labels have, else the first labels that are not background.
"""

from __future__ import annotations

import re
from typing import List, Optional, Sequence, Tuple

DEFAULT_CLASS_COUNT = 4  # watched classes of one camera when none are configured
# What a user most likely means, in order (matched against the labels, spelling-insensitive).
PREFERRED_CLASSES = ("person", "car", "cat", "dog", "bird", "bicycle", "motorbike", "motorcycle", "bus", "truck")
BACKGROUND = {"background", "__background__", "bg", "void", "unlabeled", "unlabelled", "ignore"}


def compact(label: str) -> str:
    """``Dining Table`` -> ``diningtable``: how names and labels are compared."""
    return re.sub(r"[^a-z0-9]", "", label.lower())


def is_background(label: str) -> bool:
    return compact(label) in {compact(b) for b in BACKGROUND}


def default_classes(labels: Sequence[str], count: int = DEFAULT_CLASS_COUNT) -> List[str]:
    """The classes watched when none are configured: up to ``count`` of :data:`PREFERRED_CLASSES`
    the labels have (person, car, cat, dog for PASCAL VOC and COCO), else the first labels that
    are not background."""
    by_compact = {}
    for label in labels:
        by_compact.setdefault(compact(re.split(r"[,;]", label, maxsplit=1)[0]), label)
    chosen = [by_compact[c] for c in PREFERRED_CLASSES if c in by_compact]
    if not chosen:
        chosen = [label for label in labels if not is_background(label)]
    return list(dict.fromkeys(chosen))[:max(0, count)]


def watched_classes(labels: Optional[Sequence[str]], wanted: Sequence[str],
                    count: int = DEFAULT_CLASS_COUNT) -> Tuple[List[str], List[str]]:
    """(watched labels, configured names the model does not have); ``wanted`` empty =
    :func:`default_classes`. A configured name matches a label spelling-insensitively
    (``dining table`` = ``diningtable``). Without labels nothing is watched."""
    if not labels:
        return [], list(wanted)
    if not wanted:
        return default_classes(labels, count), []
    by_compact = {}
    for label in labels:
        by_compact.setdefault(compact(label), label)
    found = [by_compact[compact(w)] for w in wanted if compact(w) in by_compact]
    return list(dict.fromkeys(found)), [w for w in wanted if compact(w) not in by_compact]
