"""Source URIs (video file, V4L2 camera, RTSP/HTTP stream) and opening them with OpenCV.

``parse_source`` is pure and checks only the form; ``open_capture`` touches the file system,
the device or the network and turns every failure into a :class:`~agent.errors.SourceError`
that says what to check.
"""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal
from urllib.parse import unquote, urlsplit, urlunsplit

from agent.errors import SourceError

if TYPE_CHECKING:
    import cv2

SourceKind = Literal["file", "v4l2", "network"]

NETWORK_SCHEMES = ("rtsp", "rtsps", "http", "https")
DEFAULT_FILE_FPS = 15.0
"""Pace of a video file whose container reports no usable frame rate."""
OPEN_TIMEOUT_S = 10.0
"""Longest a network source's open (connect, RTSP handshake) may block the capture thread."""
READ_TIMEOUT_S = 10.0
"""Longest a network source's read may wait for a frame before the source reconnects."""

ACCEPTED_FORMS = (
    "a video file path (/data/clip.mp4 or file:///data/clip.mp4), "
    "a V4L2 camera (v4l2:0, /dev/video0 or 0), "
    "or a stream URL (rtsp://, rtsps://, http://, https://)"
)

_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):(.*)$", re.DOTALL)
_DEV_VIDEO = re.compile(r"^/dev/video(\d+)$")


@dataclass(frozen=True, slots=True)
class SourceSpec:
    """A parsed source URI."""

    kind: SourceKind
    uri: str
    """As configured (may contain credentials: show :attr:`display` instead)."""
    path: str | None = None
    """file: the video path; v4l2: a device path that is not ``/dev/videoN`` (e.g. /dev/v4l/by-id/…)."""
    device: int | None = None
    """v4l2: the camera index N of ``/dev/videoN``."""
    url: str | None = None
    """network: the URL handed to FFmpeg."""

    @property
    def live(self) -> bool:
        """Cameras and streams (reconnect, newest frame wins); files are not live."""
        return self.kind != "file"

    @property
    def display(self) -> str:
        """The URI for logs and errors, with any password replaced by ``***``."""
        if self.url is not None:
            return redact_url(self.url)
        if self.device is not None:
            return f"v4l2:{self.device}"
        return self.uri

    @property
    def device_path(self) -> str | None:
        """v4l2: the device node."""
        if self.device is not None:
            return f"/dev/video{self.device}"
        return self.path if self.kind == "v4l2" else None


def redact_url(url: str) -> str:
    """``rtsp://user:secret@host/x`` -> ``rtsp://user:***@host/x``."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    user = parts.username or ""
    host = parts.netloc.rsplit("@", 1)[1]
    return urlunsplit(parts._replace(netloc=f"{user}:***@{host}"))


def _bad(uri: str, why: str) -> SourceError:
    return SourceError(f"invalid source {uri!r}: {why}; accepted forms: {ACCEPTED_FORMS}")


def _camera_index(uri: str, text: str) -> int:
    if not text.isdigit():
        raise _bad(uri, f"camera index {text!r} is not a non-negative integer")
    return int(text)


def parse_source(uri: str) -> SourceSpec:
    """Classify ``uri``; raises :class:`SourceError` for forms that can never work."""
    text = uri.strip()
    if not text:
        raise _bad(uri, "it is empty")
    if text != uri:
        raise _bad(uri, "it has leading or trailing whitespace")
    if text.isdigit() or text.startswith("/dev/") or (text.startswith("-") and text[1:].isdigit()):
        return _parse_device(uri)
    match = _SCHEME.match(text)
    if match is None or len(match.group(1)) == 1:  # no scheme, or a Windows drive letter
        return SourceSpec(kind="file", uri=uri, path=text)
    scheme, rest = match.group(1).lower(), match.group(2)
    if scheme == "v4l2":
        return SourceSpec(kind="v4l2", uri=uri, device=_camera_index(uri, rest))
    if scheme == "file":
        return _parse_file_url(uri, rest)
    if scheme in NETWORK_SCHEMES:
        return _parse_network_url(uri, scheme, rest)
    if rest.startswith("//"):
        raise _bad(uri, f"unsupported scheme {scheme!r}")
    # "name:with:colons.mp4" and similar: a relative file name, not a URL.
    return SourceSpec(kind="file", uri=uri, path=text)


def _parse_device(uri: str) -> SourceSpec:
    if uri.startswith("-"):
        raise _bad(uri, "a camera index cannot be negative")
    if uri.isdigit():
        return SourceSpec(kind="v4l2", uri=uri, device=int(uri))
    if match := _DEV_VIDEO.match(uri):
        return SourceSpec(kind="v4l2", uri=uri, device=int(match.group(1)))
    return SourceSpec(kind="v4l2", uri=uri, path=uri)  # /dev/v4l/by-id/… and friends


def _parse_network_url(uri: str, scheme: str, rest: str) -> SourceSpec:
    if not rest.startswith("//"):
        raise _bad(uri, f"a {scheme} URL starts with {scheme}://")
    parts = urlsplit(uri)
    if not parts.hostname:
        raise _bad(uri, "the URL has no host")
    try:
        _ = parts.port
    except ValueError as err:
        raise _bad(uri, f"the URL's port is not valid ({err})") from err
    return SourceSpec(kind="network", uri=uri, url=uri)


def _parse_file_url(uri: str, rest: str) -> SourceSpec:
    if not rest.startswith("//"):
        raise _bad(uri, "a file URL is file:///absolute/path")
    parts = urlsplit("file:" + rest)
    if parts.netloc not in ("", "localhost"):
        raise _bad(uri, f"file URLs name a local path (file:///…), not host {parts.netloc!r}")
    path = unquote(parts.path)
    if not path:
        raise _bad(uri, "the file URL has no path")
    return SourceSpec(kind="file", uri=uri, path=path)


def open_capture(
    spec: SourceSpec,
    *,
    open_timeout_s: float = OPEN_TIMEOUT_S,
    read_timeout_s: float = READ_TIMEOUT_S,
    decode_threads: int = 1,
) -> cv2.VideoCapture:
    """Open ``spec`` with OpenCV; the returned capture is open (the caller releases it).

    Files and network streams are decoded by FFmpeg with ``decode_threads`` threads (0: FFmpeg
    chooses, one per core); V4L2 cameras deliver frames without a decoder thread pool.

    Network sources get FFmpeg open/read timeouts so a dead camera cannot block a thread for
    longer than that. Raises :class:`SourceError` naming what to check.
    """
    import cv2

    if spec.kind == "file":
        assert spec.path is not None
        path = Path(spec.path)
        if not path.exists():
            raise SourceError(
                f"cannot open video file {path.absolute()}: it does not exist; check the "
                "stream's `source` (a relative path in the config file is resolved from the "
                "config file's folder)"
            )
        if not path.is_file():
            raise SourceError(f"cannot open video file {spec.path}: it is not a regular file")
        cap = cv2.VideoCapture(str(path), cv2.CAP_FFMPEG, _decoder_params(decode_threads))
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"cannot open video file {spec.path}: OpenCV/FFmpeg cannot decode it; check that "
                "it is a video (mp4, avi, mkv, …) and readable by the agent's user"
            )
        return cap

    if spec.kind == "v4l2":
        node = spec.device_path
        assert node is not None
        if sys.platform.startswith("linux") and not Path(node).exists():
            raise SourceError(
                f"cannot open camera {spec.display}: {node} does not exist; list cameras with "
                "`v4l2-ctl --list-devices`"
            )
        target: int | str = spec.device if spec.device is not None else node
        cap = cv2.VideoCapture(target, cv2.CAP_V4L2)
        if not cap.isOpened():
            cap.release()
            raise SourceError(
                f"cannot open camera {spec.display} ({node}): it is busy, not a capture device, "
                "or not readable; check that no other process uses it and that the agent's user "
                "is in the `video` group"
            )
        return cap

    assert spec.url is not None
    params = [
        cv2.CAP_PROP_OPEN_TIMEOUT_MSEC,
        _msec(open_timeout_s),
        cv2.CAP_PROP_READ_TIMEOUT_MSEC,
        _msec(read_timeout_s),
        *_decoder_params(decode_threads),
    ]
    cap = cv2.VideoCapture(spec.url, cv2.CAP_FFMPEG, params)
    if not cap.isOpened():
        cap.release()
        raise SourceError(
            f"cannot connect to {spec.display}: check the URL, credentials and that the camera "
            f"is reachable from this device (gave up after at most {open_timeout_s:g} s)"
        )
    return cap


def _decoder_params(threads: int) -> list[int]:
    """OpenCV open parameters for FFmpeg's decoder thread count (none: FFmpeg's default)."""
    import cv2

    return [cv2.CAP_PROP_N_THREADS, threads] if threads > 0 else []


def _msec(seconds: float) -> int:
    return max(1, round(seconds * 1000))


def nominal_fps(cap: cv2.VideoCapture, *, fallback: float = 0.0) -> float:
    """The frame rate the container/camera reports, or ``fallback`` when it reports nonsense."""
    import cv2

    fps = float(cap.get(cv2.CAP_PROP_FPS))
    if not math.isfinite(fps) or fps <= 0 or fps > 1000:
        return fallback
    return fps
