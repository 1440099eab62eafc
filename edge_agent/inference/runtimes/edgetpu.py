"""Coral Edge TPU delegate (``libedgetpu.so.1``): device strings and loading.

Not a runtime backend (it has no ``BACKEND``): any runtime can load it as a delegate.
"""

from __future__ import annotations

import ctypes
import platform
import re
from typing import Any, Callable, Dict

from edge_agent.errors import RuntimeNotAvailable

EDGETPU_CUSTOM_OP = b"edgetpu-custom-op"

_DEVICE_RE = re.compile(r"^(?:(usb|pci)(?::(\d+))?|:(\d+))$")


def library_name() -> str:
    """The delegate's shared library on this OS (as pycoral names it)."""
    system = platform.system()
    if system == "Darwin":
        return "libedgetpu.1.dylib"
    if system == "Windows":
        return "edgetpu.dll"
    return "libedgetpu.so.1"


def parse_device(device: str) -> Dict[str, str]:
    """Validate an Edge TPU device string and return the delegate options.

    "" = the first Edge TPU of any kind; ``usb``/``pci`` = first of that kind; ``usb:N``/``pci:N``
    = the N-th of that kind; ``:N`` = the N-th of any kind (libedgetpu's own syntax).
    """
    device = (device or "").strip()
    if not device:
        return {}
    if not _DEVICE_RE.match(device):
        raise RuntimeNotAvailable(
            f"bad Edge TPU device '{device}': use usb, usb:N, pci, pci:N or :N"
        )
    return {"device": device}


def load(load_delegate: Callable[..., Any], device: str) -> Any:
    """Load the Edge TPU delegate for ``device`` or raise one readable line."""
    options = parse_device(device)
    lib = library_name()
    what = f"device '{device}'" if device else "any device"
    try:
        # Probe the library first: a failed load_delegate() in LiteRT 2.x also prints a
        # spurious traceback from Delegate.__del__.
        ctypes.CDLL(lib)
    except OSError as exc:
        raise RuntimeNotAvailable(
            f"cannot load the Edge TPU delegate for {what}: {lib} is not installed "
            f"(install libedgetpu1-std from Coral's apt repository) [{_line(exc)}]"
        ) from exc
    try:
        return load_delegate(lib, options)
    except (ValueError, OSError, RuntimeError) as exc:
        raise RuntimeNotAvailable(
            f"cannot open the Edge TPU for {what} (is the Coral plugged in and is the user in "
            f"group 'plugdev'/'apex'?): {_line(exc)}"
        ) from exc


def _line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def is_edgetpu_model(model_bytes_head: bytes) -> bool:
    """True when the flatbuffer contains Coral's compiled custom op."""
    return EDGETPU_CUSTOM_OP in model_bytes_head
