#!/usr/bin/python3
"""A real RTSP server for the tests: GStreamer's (Debian's gir1.2-gst-rtsp-server-1.0) serving
``videotestsrc`` as H.264 (x264enc) on ``/h264`` and as MJPEG on ``/mjpeg``.

Run with the SYSTEM Python (``/usr/bin/python3``: ``gi`` is a Debian package, not in the venv)::

    /usr/bin/python3 tests/rtsp_server.py --port 0 --width 1280 --height 720 --fps 15 \
        [--user U --password P]

Prints ``READY <port>`` once it listens (port 0: a free one). With --user, every mount needs
those credentials (RTSP Basic authentication, GstRTSPAuth). Stops on SIGTERM/SIGINT.
"""

import argparse
import signal
import sys

import gi

gi.require_version("Gst", "1.0")
gi.require_version("GstRtspServer", "1.0")
from gi.repository import GLib, Gst, GstRtspServer  # noqa: E402

SOURCE = ("videotestsrc is-live=true pattern={pattern} ! "
          "video/x-raw,format=I420,width={width},height={height},framerate={fps}/1 ! ")
MOUNTS = {
    "/h264": SOURCE + ("x264enc tune=zerolatency speed-preset=ultrafast key-int-max={fps} ! "
                       "rtph264pay name=pay0 pt=96 config-interval=1"),
    "/mjpeg": SOURCE + "jpegenc quality=80 ! rtpjpegpay name=pay0 pt=26",
}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--width", type=int, default=1280)
    parser.add_argument("--height", type=int, default=720)
    parser.add_argument("--fps", type=int, default=15)
    parser.add_argument("--pattern", default="ball")
    parser.add_argument("--user", default="")
    parser.add_argument("--password", default="")
    args = parser.parse_args()
    Gst.init(None)
    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    mounts = server.get_mount_points()
    if args.user:
        auth = GstRtspServer.RTSPAuth()
        token = GstRtspServer.RTSPToken()
        token.set_string(GstRtspServer.RTSP_TOKEN_MEDIA_FACTORY_ROLE, "viewer")
        auth.add_basic(GstRtspServer.RTSPAuth.make_basic(args.user, args.password), token)
        server.set_auth(auth)
    for path, launch in MOUNTS.items():
        factory = GstRtspServer.RTSPMediaFactory()
        factory.set_launch("( " + launch.format(**vars(args)) + " )")
        factory.set_shared(True)
        if args.user:
            permissions = GstRtspServer.RTSPPermissions()
            permissions.add_permission_for_role("viewer", "media.factory.access", True)
            permissions.add_permission_for_role("viewer", "media.factory.construct", True)
            factory.set_permissions(permissions)
        mounts.add_factory(path, factory)
    if server.attach(None) == 0:
        print(f"cannot listen on port {args.port}", file=sys.stderr, flush=True)
        return 1
    loop = GLib.MainLoop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, sig, loop.quit)
    print(f"READY {server.get_bound_port()}", flush=True)
    loop.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
