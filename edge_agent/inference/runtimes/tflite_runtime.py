"""``tflite-runtime`` (last release 2.14; needs numpy<2). Common on older Raspberry Pi images."""

from edge_agent.inference.runtimes import package_backend

BACKEND = package_backend("tflite-runtime", 20, "tflite_runtime", aliases=("tflite_runtime", "tflite"))
