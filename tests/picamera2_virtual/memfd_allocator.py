"""picamera2 Allocator backed by memfd (for kernels without /dev/dma_heap or /dev/udmabuf).

libcamera's virtual pipeline handler maps whatever FrameBuffer fds the app hands it, so anonymous
shared memory works where no dma-buf provider exists (CI VMs/containers). Without it picamera2's
DmaAllocator fails with "Could not open any dmaHeap device".
(Adapted from ../shared/tools/libcamera-virtual/memfd_allocator.py.)
"""
import mmap
import os

import libcamera
from picamera2.allocators.allocator import Allocator, Sync


def _plane_sizes(fmt, stride, height, frame_size):
    # Semi-planar / planar YUV 4:2:0 need one FrameBuffer plane per image plane (same fd).
    if fmt in ("NV12", "NV21"):
        return [stride * height, stride * height // 2]
    if fmt in ("YUV420", "YVU420"):
        return [stride * height, stride * height // 4, stride * height // 4]
    return [frame_size]


class MemfdAllocator(Allocator):
    def __init__(self):
        super().__init__()
        self.frame_buffers = {}
        self.mapped = {}
        self.fds = []
        self.sync = MemfdSync

    def _free(self):
        for m in self.mapped.values():
            m.close()
        for fd in self.fds:
            os.close(fd)
        self.frame_buffers, self.mapped, self.fds = {}, {}, []

    def allocate(self, libcamera_config, _use_case):
        self._free()
        for sc in libcamera_config:
            fmt = str(sc.pixel_format)
            sizes = _plane_sizes(fmt, sc.stride, sc.size.height, sc.frame_size)
            total = sum(sizes)
            fbs = []
            for i in range(sc.buffer_count):
                fd = os.memfd_create(f"picamera2-{fmt}-{i}", os.MFD_CLOEXEC)
                os.ftruncate(fd, total)
                self.fds.append(fd)
                planes, off = [], 0
                for sz in sizes:
                    p = libcamera.FrameBuffer.Plane()
                    p.fd, p.offset, p.length = fd, off, sz
                    planes.append(p)
                    off += sz
                fb = libcamera.FrameBuffer(planes)
                self.mapped[fb] = mmap.mmap(fd, total, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                fbs.append(fb)
            self.frame_buffers[sc.stream] = fbs

    def buffers(self, stream):
        return self.frame_buffers[stream]

    def close(self):
        self._free()


class MemfdSync(Sync):
    def __init__(self, allocator, fb, write):
        self._m = allocator.mapped[fb]

    def __enter__(self):
        return self._m

    def __exit__(self, *exc):
        pass
