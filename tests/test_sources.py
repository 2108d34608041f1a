"""Camera/video sources with real OpenCV on the shipped video and a real MJPEG-over-HTTP camera."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from agent.sources import QUEUE_DEPTH, Frame, FrameSource, Grabbed
from tests.mjpeg_server import MjpegServer, encode_video
from tests.waiting import wait_for

VIDEO_FRAMES = 150
VIDEO_FPS = 15.0

# -- helpers ---------------------------------------------------------------------------------


class States:
    """Records ``on_state`` calls and lets a test wait for one."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str | None]] = []
        self._cond = threading.Condition()

    def __call__(self, state: str, error: str | None) -> None:
        with self._cond:
            self.seen.append((state, error))
            self._cond.notify_all()

    def names(self) -> list[str]:
        with self._cond:
            return [s for s, _ in self.seen]

    def wait_for(self, state: str, *, after: int = 0, timeout: float = 10.0) -> str | None:
        """Wait until ``state`` was entered (at position >= ``after``); returns its error."""
        (error,) = wait_for(
            lambda: next(((err,) for s, err in self.seen[after:] if s == state), None),
            timeout=timeout,
            what=lambda: f"state {state!r}; seen {self.seen}",
            condition=self._cond,
        )
        return error


def take(source: FrameSource, n: int, *, timeout: float = 10.0) -> list[Frame]:
    frames: list[Frame] = []

    def enough() -> bool:
        frame = source.get(timeout=0.1)
        if frame is not None:
            frames.append(frame)
        return len(frames) >= n

    wait_for(
        enough,
        timeout=timeout,
        interval=0,
        what=lambda: f"{n} frames; got {len(frames)}: {source.stats()}",
    )
    return frames


@pytest.fixture
def video(assets: Path) -> Path:
    return assets / "face-walk-640x480.mp4"


@pytest.fixture
def make_source() -> Iterator[Callable[..., FrameSource]]:
    """Builds started sources and stops every one of them after the test."""
    made: list[FrameSource] = []

    def make(*, retrieve: Callable[[int], bool] | None = None, **kwargs: Any) -> FrameSource:
        kwargs.setdefault("name", "cam")
        source = FrameSource(**kwargs)
        source.set_retrieve(retrieve)
        made.append(source)
        source.start()
        return source

    yield make
    for source in made:
        source.stop(timeout=5.0)


@pytest.fixture(scope="session")
def jpeg_frames(assets: Path) -> list[bytes]:
    return encode_video(assets / "face-walk-640x480.mp4", limit=30)


# -- video files -----------------------------------------------------------------------------


def test_file_as_fast_as_possible_delivers_every_frame_in_order_then_ends(
    video: Path, make_source: Callable[..., FrameSource]
) -> None:
    states = States()
    source = make_source(
        uri=str(video), realtime=False, loop=False, on_state=states, clock=lambda: 1234.5
    )
    frames: list[Frame] = []
    while (frame := source.get(timeout=10.0)) is not None:
        frames.append(frame)
    assert source.ended
    assert [f.index for f in frames] == list(range(VIDEO_FRAMES))
    assert [f.file_frame for f in frames] == list(range(VIDEO_FRAMES))
    assert all(f.image.shape == (480, 640, 3) and f.image.dtype == np.uint8 for f in frames)
    assert all(f.ts == 1234.5 and f.prepared is None for f in frames)
    monos = [f.mono for f in frames]
    assert monos == sorted(monos)
    stats = source.stats()
    assert (stats.state, stats.error) == ("ended", None)
    assert (stats.frames_captured, stats.frames_dropped) == (VIDEO_FRAMES, 0)
    assert stats.fps_nominal == VIDEO_FPS
    assert states.names() == ["running", "ended"]
    assert source.get(timeout=5.0) is None  # at once: nothing more can come
    source.stop()
    assert states.names()[-1] == "stopped"


def test_file_as_fast_as_possible_waits_for_the_consumer_and_stops_promptly(
    video: Path, make_source: Callable[..., FrameSource]
) -> None:
    source = make_source(uri=str(video), realtime=False, loop=True)
    wait_for(lambda: source.stats().frames_captured == QUEUE_DEPTH, timeout=10, what="queue filled")
    time.sleep(0.3)  # room for a (wrong) read-ahead past the bound to show up
    assert source.stats().frames_captured == QUEUE_DEPTH
    assert source.stats().state == "running"
    started = time.monotonic()
    source.stop(timeout=5.0)
    assert time.monotonic() - started < 2.0
    assert source.stats().state == "stopped"


def test_looping_file_keeps_counting_and_file_frame_wraps(
    video: Path, make_source: Callable[..., FrameSource]
) -> None:
    source = make_source(uri=str(video), realtime=False, loop=True)
    frames = take(source, 2 * VIDEO_FRAMES + 20)
    assert [f.index for f in frames] == list(range(len(frames)))
    assert [f.file_frame for f in frames] == [i % VIDEO_FRAMES for i in range(len(frames))]
    # Rewinding really went back to the first frame.
    assert np.array_equal(frames[VIDEO_FRAMES].image, frames[0].image)
    assert np.array_equal(frames[2 * VIDEO_FRAMES + 7].image, frames[7].image)
    assert source.stats().state == "running"
    assert not source.ended


def test_realtime_file_is_paced_at_its_frame_rate(
    video: Path, make_source: Callable[..., FrameSource]
) -> None:
    source = make_source(uri=str(video), realtime=True, loop=True)
    first = source.get(timeout=10.0)
    assert first is not None
    start = time.monotonic()
    got = 0
    while time.monotonic() - start < 1.0:
        if source.get(timeout=0.1) is not None:
            got += 1
    stats = source.stats()
    # 15 fps; loose bounds: this asserts pacing happens, not how precisely.
    assert 8 <= got <= 25, got
    assert 8 <= stats.frames_captured - 1 <= 26, stats
    assert stats.fps_nominal == VIDEO_FPS


def test_slow_consumer_gets_the_newest_frame_and_drops_are_counted(
    video: Path, make_source: Callable[..., FrameSource]
) -> None:
    source = make_source(uri=str(video), realtime=True, loop=True)
    processed: list[Frame] = []
    work = threading.Event()  # never set: wait() is the consumer's simulated 0.2 s of work
    while len(processed) < 5:
        frame = source.get(timeout=10.0)
        assert frame is not None
        processed.append(frame)
        work.wait(0.2)
    source.stop()
    pending = 0
    while source.get(timeout=0) is not None:
        pending += 1
    stats = source.stats()
    assert stats.frames_dropped > 0
    assert pending <= 1
    assert stats.frames_captured == len(processed) + stats.frames_dropped + pending
    indices = [f.index for f in processed]
    assert indices == sorted(indices)
    assert max(b - a for a, b in itertools.pairwise(indices)) > 1  # frames skipped


def test_transform_runs_in_the_capture_thread_and_lands_on_the_frame(
    video: Path, make_source: Callable[..., FrameSource]
) -> None:
    threads: set[str] = set()

    def prepare(image: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
        threads.add(threading.current_thread().name)
        return cv2.resize(image, (128, 128), interpolation=cv2.INTER_AREA)

    source = make_source(name="door", uri=str(video), realtime=False, transform=prepare)
    frames = take(source, 10)
    for frame in frames:
        assert isinstance(frame.prepared, np.ndarray)
        assert frame.prepared.shape == (128, 128, 3)
        assert np.array_equal(
            frame.prepared, cv2.resize(frame.image, (128, 128), interpolation=cv2.INTER_AREA)
        )
    assert threads == {"source-door"}
    assert threading.current_thread().name not in threads


def test_raising_transform_gives_none_and_can_be_swapped_at_runtime(
    video: Path, make_source: Callable[..., FrameSource]
) -> None:
    def broken(image: np.ndarray[Any, Any]) -> object:
        raise RuntimeError("model exploded")

    source = make_source(uri=str(video), realtime=False, loop=True, transform=broken)
    frames = take(source, 20)
    assert all(f.prepared is None for f in frames)
    assert source.stats().transform_errors >= 20
    assert source.stats().state == "running"

    source.set_transform(lambda image: ("v2", image.shape))
    # Up to QUEUE_DEPTH frames were prepared by the old transform before the swap.
    after = take(source, QUEUE_DEPTH + 5)
    assert after[-1].prepared == ("v2", (480, 640, 3))
    assert all(f.prepared is None for f in after if f.prepared != ("v2", (480, 640, 3)))
    assert [f.index for f in frames + after] == list(range(len(frames) + len(after)))


def every_third(index: int) -> bool:
    return index % 3 == 0


def test_frames_the_retrieve_predicate_passes_over_are_only_grabbed(
    video: Path, make_source: Callable[..., FrameSource]
) -> None:
    transformed: list[tuple[int, int]] = []
    plain = make_source(uri=str(video), realtime=False, loop=False)
    images = [f.image for f in take(plain, VIDEO_FRAMES)]
    source = make_source(
        uri=str(video),
        realtime=False,
        loop=False,
        retrieve=every_third,
        transform=lambda image: transformed.append(image.shape[:2]),
    )
    items: list[Frame | Grabbed] = []
    while (item := source.get_any(timeout=10.0)) is not None:
        items.append(item)
    assert [i.index for i in items] == list(range(VIDEO_FRAMES))
    assert [i.file_frame for i in items] == list(range(VIDEO_FRAMES))
    frames = [i for i in items if isinstance(i, Frame)]
    assert [f.index for f in frames] == list(range(0, VIDEO_FRAMES, 3))
    assert all(isinstance(i, Grabbed) for i in items if i.index % 3)
    # A grab moved the decoder on: each image is the frame of its own index.
    assert all(np.array_equal(f.image, images[f.index]) for f in frames)
    assert len(transformed) == len(frames), "grabbed frames are not transformed"
    stats = source.stats()
    assert (stats.frames_captured, stats.frames_dropped) == (VIDEO_FRAMES, 0)
    assert stats.frames_grab_only == VIDEO_FRAMES - len(frames) == 100
    assert plain.stats().frames_grab_only == 0


def test_get_passes_over_grabbed_frames_and_a_looping_file_keeps_its_schedule(
    video: Path, make_source: Callable[..., FrameSource]
) -> None:
    source = make_source(uri=str(video), realtime=False, loop=True, retrieve=every_third)
    frames = take(source, VIDEO_FRAMES)  # two loops of the file
    assert [f.index for f in frames] == list(range(0, 3 * VIDEO_FRAMES, 3))
    assert [f.file_frame for f in frames] == [i % VIDEO_FRAMES for i in range(0, 450, 3)]
    assert np.array_equal(frames[50].image, frames[0].image)  # file frame 0 again


def test_a_grabbed_frame_does_not_displace_a_waiting_image(
    video: Path, make_source: Callable[..., FrameSource]
) -> None:
    source = make_source(uri=str(video), realtime=True, loop=True, retrieve=every_third)
    taken: list[Frame | Grabbed] = []
    work = threading.Event()  # never set: the consumer's 0.4 s of work, 6 frames at 15 fps
    while len(taken) < 6:
        item = source.get_any(timeout=10.0)
        assert item is not None
        taken.append(item)
        work.wait(0.4)
    source.stop()
    stats = source.stats()
    # Each 0.4 s brings an image frame, which stays until the next image frame replaces it.
    images = sum(isinstance(i, Frame) for i in taken[1:])
    assert images >= 4, [type(i).__name__ for i in taken]
    assert stats.frames_dropped > 0 and stats.frames_grab_only > 0


def test_a_live_camera_only_grabs_but_retrieves_the_first_frame_of_each_connection(
    jpeg_frames: list[bytes], make_source: Callable[..., FrameSource]
) -> None:
    server = MjpegServer(jpeg_frames, fps=30.0).start()
    try:
        states = States()
        source = make_source(
            uri=server.url,
            reconnect_min_s=0.1,
            reconnect_max_s=0.4,
            open_timeout_s=3.0,
            read_timeout_s=3.0,
            on_state=states,
            retrieve=lambda index: False,
        )
        first = source.get(timeout=10.0)
        assert first is not None and first.index == 0 and first.image.shape == (480, 640, 3)
        wait_for(lambda: source.stats().frames_grab_only >= 5, timeout=10, what="grabs")
        server.stop()
        states.wait_for("reconnecting")
        boundary = source.stats().frames_captured  # the next connection's first index
        server.start()
        again = source.get(timeout=10.0)  # passes over grabbed frames
        assert again is not None and again.index == boundary, (again, boundary)
        assert again.image.shape == (480, 640, 3)
        stats = source.stats()
        assert stats.frames_grab_only == stats.frames_captured - 2
    finally:
        server.stop()


def test_missing_file_fails_once_naming_the_path(
    tmp_path: Path, make_source: Callable[..., FrameSource]
) -> None:
    missing = tmp_path / "nope" / "clip.mp4"
    states = States()
    source = make_source(uri=str(missing), on_state=states)
    error = states.wait_for("failed")
    assert error is not None
    assert str(missing) in error
    assert "does not exist" in error
    assert source.get(timeout=5.0) is None
    assert source.ended
    stats = source.stats()
    assert (stats.state, stats.reconnects, stats.frames_captured) == ("failed", 0, 0)
    assert states.names() == ["failed"]


def test_file_that_is_not_a_video_fails_with_a_hint(
    tmp_path: Path, make_source: Callable[..., FrameSource]
) -> None:
    junk = tmp_path / "notes.mp4"
    junk.write_bytes(b"this is not a video\n" * 100)
    states = States()
    make_source(uri=f"file://{junk}", on_state=states)
    error = states.wait_for("failed")
    assert error is not None
    assert str(junk) in error
    assert "decode" in error


# -- cameras and streams ---------------------------------------------------------------------


def test_absent_camera_keeps_retrying_with_a_clear_error_and_stops_promptly(
    make_source: Callable[..., FrameSource],
) -> None:
    assert not Path("/dev/video57").exists()
    states = States()
    source = make_source(uri="v4l2:57", reconnect_min_s=30.0, reconnect_max_s=60.0, on_state=states)
    error = states.wait_for("reconnecting")
    assert error is not None
    assert "v4l2:57" in error
    assert "/dev/video57 does not exist" in error
    assert "v4l2-ctl --list-devices" in error
    assert source.get(timeout=0.05) is None
    assert not source.ended
    started = time.monotonic()  # the thread now sleeps in a 15-30 s backoff
    source.stop(timeout=5.0)
    assert time.monotonic() - started < 2.0
    assert source.stats().state == "stopped"
    assert source.ended


def test_absent_camera_counts_reconnect_attempts(make_source: Callable[..., FrameSource]) -> None:
    source = make_source(uri="/dev/video57", reconnect_min_s=0.01, reconnect_max_s=0.05)
    wait_for(lambda: source.stats().reconnects >= 3, timeout=10, what="three reconnect attempts")
    assert source.stats().state == "reconnecting"


def test_mjpeg_camera_reconnects_after_it_goes_away_and_comes_back(
    jpeg_frames: list[bytes], make_source: Callable[..., FrameSource]
) -> None:
    server = MjpegServer(jpeg_frames, fps=30.0).start()
    try:
        url = server.url
        states = States()
        source = make_source(
            uri=url,
            reconnect_min_s=0.1,
            reconnect_max_s=0.4,
            open_timeout_s=3.0,
            read_timeout_s=3.0,
            on_state=states,
        )
        before = take(source, 5)
        assert all(f.image.shape == (480, 640, 3) for f in before)
        assert states.names() == ["running"]

        server.stop()
        error = states.wait_for("reconnecting")
        assert error is not None
        assert url in error
        wait_for(lambda: source.stats().reconnects >= 2, timeout=10, what="reconnect attempts")
        assert source.stats().state == "reconnecting"
        assert "cannot connect to" in (source.stats().error or "")
        assert "check the URL, credentials" in (source.stats().error or "")

        marks = len(states.seen)
        server.start()  # same port
        assert states.wait_for("running", after=marks) is None
        after = take(source, 5)
        assert after[0].index > before[-1].index  # a running counter across reconnects
        indices = [f.index for f in after]
        assert indices == sorted(indices)
        assert source.stats().error is None
    finally:
        server.stop()
