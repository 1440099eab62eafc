"""Full TensorFlow's ``tf.lite`` interpreter: the last fallback (hosts with TF installed)."""

from edge_agent.inference.runtimes import RuntimeBackend


def _tf():
    import tensorflow as tf

    return tf


def _interpreter():
    return _tf().lite.Interpreter


def _load_delegate():
    return _tf().lite.experimental.load_delegate


def _version() -> str:
    return _tf().__version__


BACKEND = RuntimeBackend(
    name="tensorflow",
    priority=30,
    module="tensorflow",
    interpreter=_interpreter,
    load_delegate=_load_delegate,
    version=_version,
    aliases=("tf", "tf.lite", "tensorflow.lite"),
)
