"""LiteRT (``ai-edge-litert``), the successor of tflite-runtime; XNNPACK on CPU. Fastest here."""

from . import RuntimeBackend


def _interpreter():
    from ai_edge_litert.interpreter import Interpreter

    return Interpreter


def _load_delegate():
    from ai_edge_litert.interpreter import load_delegate

    return load_delegate


def _version() -> str:
    import ai_edge_litert

    return getattr(ai_edge_litert, "__version__", "unknown")


BACKEND = RuntimeBackend(
    name="litert",
    priority=10,
    module="ai_edge_litert",
    interpreter=_interpreter,
    load_delegate=_load_delegate,
    version=_version,
    aliases=("ai-edge-litert", "ai_edge_litert"),
)
