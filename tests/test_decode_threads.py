"""FFmpeg decoder threads per stream (``streams[].decode_threads``, issue 15).

One decoder thread costs the least CPU per frame at camera resolutions; the agent opens files
and network streams with one unless the stream's config says otherwise.
"""

from __future__ import annotations

import os
from pathlib import Path

import cv2
import pytest

from agent.capture import open_capture, parse_source
from agent.config import load_config
from agent.errors import ConfigError
from agent.sources import FrameSource
from inference import ASSETS_DIR

VIDEO = ASSETS_DIR / "face-walk-640x480.mp4"


def _decoder_threads() -> list[str]:
    """Names of this process's FFmpeg frame-decoding threads (``av:<codec>:df<N>``)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            names.append(Path(f"/proc/self/task/{tid}/comm").read_text().strip())
        except OSError:
            continue
    return sorted(n for n in names if n.startswith("av:"))


@pytest.mark.parametrize("threads", [1, 2])
def test_a_file_is_decoded_with_the_configured_thread_count(threads: int) -> None:
    cap = open_capture(parse_source(str(VIDEO)), decode_threads=threads)
    try:
        assert cap.read()[0]
        assert cap.get(cv2.CAP_PROP_N_THREADS) == threads
        # FFmpeg starts a thread pool only for more than one thread.
        assert len(_decoder_threads()) == (0 if threads == 1 else threads)
    finally:
        cap.release()


def test_zero_lets_ffmpeg_choose() -> None:
    cap = open_capture(parse_source(str(VIDEO)), decode_threads=0)
    try:
        assert cap.read()[0]
        assert cap.get(cv2.CAP_PROP_N_THREADS) >= 1
    finally:
        cap.release()


def test_a_stream_source_decodes_on_one_thread_by_default() -> None:
    source = FrameSource(name="cam", uri=str(VIDEO), loop=False, realtime=False)
    source.start()
    try:
        frame = source.get(timeout=10)
        assert frame is not None
        assert _decoder_threads() == []
    finally:
        source.request_stop()
        source.join(10)


def _config(tmp_path: Path, value: str) -> Path:
    path = tmp_path / "agent.toml"
    path.write_text(
        f'device_id = "d1"\nstate_dir = "{tmp_path}"\n[[streams]]\nname = "cam"\n'
        f'source = "{VIDEO}"\nmodel = "builtin:blazeface-short-int8"\n'
        f"decode_threads = {value}\n",
        encoding="utf-8",
    )
    return path


@pytest.mark.parametrize("value", ["0", "1", "4", "16"])
def test_config_accepts_decode_threads_in_range(tmp_path: Path, value: str) -> None:
    loaded = load_config(_config(tmp_path, value))
    assert loaded.config.streams[0].decode_threads == int(value)


@pytest.mark.parametrize("value", ["-1", "17", '"two"'])
def test_config_refuses_decode_threads_out_of_range(tmp_path: Path, value: str) -> None:
    with pytest.raises(ConfigError, match="decode_threads"):
        load_config(_config(tmp_path, value))
