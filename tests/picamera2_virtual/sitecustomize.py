"""Applied at interpreter start when this folder is on PYTHONPATH (tests/test_picamera2_real.py
sets it for the processes it runs in the root): picamera2 patched for the virtual camera before
the agent imports it. A failure here is loud: the test must not silently run unpatched."""
import picam2_virtual_shim  # noqa: F401
