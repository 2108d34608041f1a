"""A real RTSP server (GStreamer's gst-rtsp-server) serving a video file, for agent tests.

Run it with the system Python (``/usr/bin/python3``), which has the GObject bindings: the
project's venv cannot import ``gi``. Needs the Debian packages ``python3-gi``,
``gir1.2-gst-rtsp-server-1.0``, ``gstreamer1.0-plugins-good``/``-bad``/``-ugly`` and
``gstreamer1.0-libav`` (``make rtsp-deps`` installs them).

    /usr/bin/python3 tests/rtsp_server.py --port 8554 --video clip.mp4

serves ``rtsp://127.0.0.1:PORT/stream``: every client gets its own playback of the file from
its start (no re-encoding: the file's video is packetised as it is); at the file's end the
stream ends, so a client sees the stream close and has to reconnect. The server prints
``READY <port>`` on stdout once it listens and runs until SIGTERM/SIGINT; stopping it and
starting it again on the same port is a camera that goes away and comes back.

Exit codes: 0 on SIGTERM/SIGINT, 3 when GStreamer or one of its plugins is missing (the
message on stderr names the Debian package), 4 when the port cannot be bound.
"""

from __future__ import annotations

import argparse
import signal
import sys
from pathlib import Path

PACKAGES = (
    "python3-gi gir1.2-gst-rtsp-server-1.0 gstreamer1.0-plugins-good gstreamer1.0-plugins-bad "
    "gstreamer1.0-plugins-ugly gstreamer1.0-libav"
)
MISSING = 3
CANNOT_BIND = 4

# Video codecs (QuickTime/MP4 caps) → the parser and RTP payloader elements for them.
PAYLOADERS = {
    "video/mpeg": ("mpeg4videoparse", "rtpmp4vpay"),
    "video/x-h264": ("h264parse", "rtph264pay"),
    "video/x-h265": ("h265parse", "rtph265pay"),
}


def _missing(what: str) -> None:
    print(
        f"rtsp_server: {what}; install the Debian packages: apt-get install -y {PACKAGES} "
        "(or `make rtsp-deps`)",
        file=sys.stderr,
        flush=True,
    )
    sys.exit(MISSING)


def _video_caps(video: Path) -> str:
    """The media type of ``video``'s first video track (e.g. ``video/mpeg``)."""
    from gi.repository import GstPbutils  # type: ignore[import-not-found]

    discoverer = GstPbutils.Discoverer.new(10 * 1_000_000_000)
    info = discoverer.discover_uri(video.resolve().as_uri())
    streams = info.get_video_streams()
    if not streams:
        print(f"rtsp_server: {video} has no video track", file=sys.stderr, flush=True)
        sys.exit(2)
    caps = streams[0].get_caps()
    return str(caps.get_structure(0).get_name())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True, help="TCP port on 127.0.0.1")
    parser.add_argument("--video", type=Path, required=True, help="video file (MP4)")
    parser.add_argument("--mount", default="/stream", help="path of the stream (/stream)")
    args = parser.parse_args()
    if not args.video.is_file():
        print(f"rtsp_server: {args.video} does not exist", file=sys.stderr, flush=True)
        sys.exit(2)

    try:
        import gi  # type: ignore[import-not-found]

        gi.require_version("Gst", "1.0")
        gi.require_version("GstRtspServer", "1.0")
        gi.require_version("GstPbutils", "1.0")
        from gi.repository import GLib, Gst, GstRtspServer
    except (ImportError, ValueError) as err:
        _missing(f"cannot load GStreamer's RTSP server bindings ({err})")

    Gst.init(None)
    media_type = _video_caps(args.video)
    if media_type not in PAYLOADERS:
        print(f"rtsp_server: no RTP payloader for {media_type}", file=sys.stderr, flush=True)
        sys.exit(2)
    parser_name, payloader = PAYLOADERS[media_type]
    for element in ("filesrc", "qtdemux", parser_name, payloader):
        if Gst.ElementFactory.find(element) is None:
            _missing(f"the GStreamer element {element!r} is not installed")

    server = GstRtspServer.RTSPServer()
    server.set_address("127.0.0.1")
    server.set_service(str(args.port))
    factory = GstRtspServer.RTSPMediaFactory()
    location = str(args.video.resolve()).replace('"', '\\"')
    factory.set_launch(
        f'( filesrc location="{location}" ! qtdemux ! {parser_name} config-interval=-1 ! '
        f"{payloader} config-interval=1 name=pay0 pt=96 )"
    )
    factory.set_shared(False)
    server.get_mount_points().add_factory(args.mount, factory)

    loop = GLib.MainLoop()
    try:
        server.attach(None)
    except GLib.Error as err:
        print(f"rtsp_server: cannot listen on port {args.port}: {err}", file=sys.stderr, flush=True)
        sys.exit(CANNOT_BIND)
    if server.get_bound_port() <= 0:
        print(f"rtsp_server: cannot listen on port {args.port}", file=sys.stderr, flush=True)
        sys.exit(CANNOT_BIND)

    def stop(*_: object) -> bool:
        loop.quit()
        return False

    for signum in (signal.SIGTERM, signal.SIGINT):
        GLib.unix_signal_add(GLib.PRIORITY_DEFAULT, signum, stop)
    print(f"READY {server.get_bound_port()}", flush=True)
    loop.run()


if __name__ == "__main__":
    main()
