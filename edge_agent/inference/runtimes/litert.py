"""LiteRT (``ai-edge-litert``), the successor of tflite-runtime; XNNPACK on CPU. Fastest here."""

from edge_agent.inference.runtimes import package_backend

BACKEND = package_backend("litert", 10, "ai_edge_litert", aliases=("ai-edge-litert", "ai_edge_litert"))
