"""Stub for python3-kms++ (pykms), which Debian does not package: ``import picamera2`` imports it
for the DRM preview only, which headless capture never uses.
(From ../shared/tools/libcamera-virtual/pykms.py.)"""


class _Names:
    def __getattr__(self, name):
        return name


PixelFormat = _Names()
PlaneType = _Names()
