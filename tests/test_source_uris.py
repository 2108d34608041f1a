"""Source URIs (``agent.capture.parse_source``: the accepted forms, the refused ones with
what is accepted, credentials kept out of logs) and the reconnect backoff the sources use
(``common.backoff``). Split from tests/test_sources.py, which tests the capture itself."""

from __future__ import annotations

import random
from typing import Any

import pytest

from agent.capture import parse_source, redact_url
from agent.errors import AgentError, SourceError
from agent.sources import FrameSource
from common.backoff import Backoff

# -- backoff ---------------------------------------------------------------------------------


def test_backoff_without_jitter_doubles_up_to_max() -> None:
    backoff = Backoff(1.0, 8.0, jitter=0.0)
    assert [backoff.next() for _ in range(6)] == [1.0, 2.0, 4.0, 8.0, 8.0, 8.0]
    assert backoff.attempts == 6


def test_backoff_jitter_stays_in_band_and_is_reproducible_with_a_seed() -> None:
    a = Backoff(0.5, 10.0, factor=3.0, jitter=0.5, rng=random.Random(7))
    b = Backoff(0.5, 10.0, factor=3.0, jitter=0.5, rng=random.Random(7))
    delays = [a.next() for _ in range(8)]
    assert delays == [b.next() for _ in range(8)]
    ceilings = [min(10.0, 0.5 * 3.0**n) for n in range(8)]
    for delay, ceiling in zip(delays, ceilings, strict=True):
        assert ceiling * 0.5 <= delay <= ceiling
    assert delays != ceilings  # the jitter actually moved them


def test_backoff_full_jitter_can_go_below_half() -> None:
    backoff = Backoff(1.0, 1.0, jitter=1.0, rng=random.Random(1))
    delays = [backoff.next() for _ in range(50)]
    assert all(0.0 <= d <= 1.0 for d in delays)
    assert min(delays) < 0.5


def test_backoff_reset_starts_again_at_min() -> None:
    backoff = Backoff(0.1, 30.0, jitter=0.0)
    for _ in range(5):
        backoff.next()
    backoff.reset()
    assert backoff.attempts == 0
    assert backoff.next() == pytest.approx(0.1)


def test_backoff_grows_without_overflow_after_many_attempts() -> None:
    backoff = Backoff(1.0, 30.0, factor=10.0, jitter=0.0)
    for _ in range(10_000):
        delay = backoff.next()
    assert delay == 30.0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"min_s": 0.0, "max_s": 1.0}, "min_s"),
        ({"min_s": 2.0, "max_s": 1.0}, "max_s"),
        ({"min_s": 1.0, "max_s": 2.0, "factor": 0.5}, "factor"),
        ({"min_s": 1.0, "max_s": 2.0, "jitter": 1.5}, "jitter"),
    ],
)
def test_backoff_rejects_bad_arguments(kwargs: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        Backoff(**kwargs)


# -- URI parsing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "kind", "path", "device", "url"),
    [
        ("clip.mp4", "file", "clip.mp4", None, None),
        ("/data/videos/clip.mp4", "file", "/data/videos/clip.mp4", None, None),
        ("file:///data/my%20clip.mp4", "file", "/data/my clip.mp4", None, None),
        ("file://localhost/data/a.mp4", "file", "/data/a.mp4", None, None),
        ("cam:2024-01-01.mp4", "file", "cam:2024-01-01.mp4", None, None),
        ("v4l2:3", "v4l2", None, 3, None),
        ("V4L2:0", "v4l2", None, 0, None),
        ("/dev/video2", "v4l2", None, 2, None),
        ("0", "v4l2", None, 0, None),
        (
            "/dev/v4l/by-id/usb-cam-video-index0",
            "v4l2",
            "/dev/v4l/by-id/usb-cam-video-index0",
            None,
            None,
        ),
        (
            "rtsp://user:pw@10.0.0.5:554/stream1",
            "network",
            None,
            None,
            "rtsp://user:pw@10.0.0.5:554/stream1",
        ),
        ("rtsps://cam.local/live", "network", None, None, "rtsps://cam.local/live"),
        (
            "http://127.0.0.1:8080/stream.mjpg",
            "network",
            None,
            None,
            "http://127.0.0.1:8080/stream.mjpg",
        ),
        ("https://cam.example/video.mp4", "network", None, None, "https://cam.example/video.mp4"),
    ],
)
def test_parse_source_accepts_documented_forms(
    uri: str, kind: str, path: str | None, device: int | None, url: str | None
) -> None:
    spec = parse_source(uri)
    assert (spec.kind, spec.path, spec.device, spec.url) == (kind, path, device, url)
    assert spec.live == (kind != "file")


@pytest.mark.parametrize(
    ("uri", "why"),
    [
        ("", "empty"),
        (" clip.mp4", "whitespace"),
        ("v4l2:abc", "camera index"),
        ("v4l2:", "camera index"),
        ("v4l2:-1", "camera index"),
        ("-1", "negative"),
        ("ftp://host/clip.mp4", "unsupported scheme 'ftp'"),
        ("rtsp:/cam/stream", "rtsp://"),
        ("http://", "no host"),
        ("http://cam:99999/x", "port"),
        ("file://otherhost/clip.mp4", "otherhost"),
        ("file:relative.mp4", "file:///"),
    ],
)
def test_parse_source_rejects_bad_forms_with_the_accepted_ones(uri: str, why: str) -> None:
    with pytest.raises(SourceError, match="accepted forms") as info:
        parse_source(uri)
    assert why in str(info.value)
    assert "v4l2:0" in str(info.value)
    assert isinstance(info.value, AgentError)


def test_frame_source_rejects_a_bad_uri_at_construction() -> None:
    with pytest.raises(SourceError, match="unsupported scheme"):
        FrameSource(name="cam", uri="gopher://cam/x")


def test_credentials_are_redacted_in_display() -> None:
    spec = parse_source("rtsp://admin:hunter2@10.0.0.5/stream")
    assert spec.display == "rtsp://admin:***@10.0.0.5/stream"
    assert "hunter2" not in spec.display
    assert redact_url("http://cam/x") == "http://cam/x"
