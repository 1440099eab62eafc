"""Minimal patches so unmodified picamera2 runs on libcamera's *virtual* camera in a CI root.

1. pykms (python3-kms++) is not in Debian: ``pykms.py`` beside this file (import-time only).
2. No /dev/dma_heap or /dev/udmabuf: picamera2's default DmaAllocator -> MemfdAllocator.
3. libcamera's virtual pipeline rejects StreamRole.Raw, which Picamera2() probes at open ("Camera
   __init__ sequence did not complete"): fall back to the processed formats' modes.
(Adapted from ../shared/tools/libcamera-virtual/picam2_virtual_shim.py.)
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import libcamera  # noqa: E402
import picamera2.picamera2 as _p2  # noqa: E402
from memfd_allocator import MemfdAllocator  # noqa: E402

_p2.DmaAllocator = MemfdAllocator

_orig_raw_modes = _p2.Picamera2._get_raw_modes


def _get_raw_modes(self):
    if self.camera.generate_configuration([libcamera.StreamRole.Raw]) is not None:
        return _orig_raw_modes(self)
    fmts = self.camera.generate_configuration([libcamera.StreamRole.VideoRecording]).at(0).formats
    return [{"format": str(p), "size": (s.width, s.height)} for p in fmts.pixel_formats for s in fmts.sizes(p)]


_p2.Picamera2._get_raw_modes = _get_raw_modes
APPLIED = True
