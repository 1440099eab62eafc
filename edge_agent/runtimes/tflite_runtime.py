"""``tflite-runtime`` (last release 2.14; needs numpy<2). Common on older Raspberry Pi images."""

from . import RuntimeBackend


def _interpreter():
    from tflite_runtime.interpreter import Interpreter

    return Interpreter


def _load_delegate():
    from tflite_runtime.interpreter import load_delegate

    return load_delegate


def _version() -> str:
    import tflite_runtime

    return getattr(tflite_runtime, "__version__", "unknown")


BACKEND = RuntimeBackend(
    name="tflite-runtime",
    priority=20,
    module="tflite_runtime",
    interpreter=_interpreter,
    load_delegate=_load_delegate,
    version=_version,
    aliases=("tflite_runtime", "tflite"),
)
