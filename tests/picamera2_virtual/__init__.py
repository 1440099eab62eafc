"""Test fixtures that let UNMODIFIED picamera2 run on libcamera's virtual camera in a CI root.

Adapted from ../shared/tools/libcamera-virtual (pykms.py, memfd_allocator.py,
picam2_virtual_shim.py; measured there on an x86_64 Debian 12 host without camera, kernel modules
or dma-buf heap). They are site-specific to such a machine, so they live here and never in the
product: tests/test_picamera2_real.py copies this folder into the trixie root and puts it on
PYTHONPATH, where ``sitecustomize.py`` applies the shim before the agent imports picamera2. On a
Raspberry Pi the agent uses picamera2's defaults (DmaAllocator, the Raw-role probe).
"""
