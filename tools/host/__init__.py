"""Host-side model tools: build, rebuild, quantize (PTQ/QAT), convert, evaluate and check DeepLab.

Needs the ``host`` extra (TensorFlow, tf-keras, tensorflow-model-optimization). Run as
``python -m tools.host <command>``; every user-caused failure is an ``EdgeAgentError`` with a
one-line message and a non-zero exit code.
"""

from __future__ import annotations

import os

# tf-keras (Keras 2) is what tfmot supports; make TensorFlow pick it for tf.keras too.
os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
