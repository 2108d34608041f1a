"""Config of motion gating (``[streams.motion]``) and cross-stream batching (``[batching]``)."""

from __future__ import annotations

import pytest

from agent.config import parse_config
from agent.errors import ConfigError

BASE = """\
device_id = "cam-01"

[[streams]]
name = "front"
source = "video.mp4"
model = "builtin:blazeface-short-int8"
"""


def test_gating_and_batching_are_off_by_default() -> None:
    cfg = parse_config(BASE)
    motion = cfg.streams[0].motion
    assert motion.enabled is False
    assert (motion.threshold, motion.min_area, motion.max_skip_s) == (20, 0.003, 2.0)
    assert (motion.width, motion.on_skip, motion.check_every) == (64, "nothing", 3)
    assert cfg.batching.mode == "off"
    assert cfg.batching.max_wait_ms == 40.0


def test_motion_keys_are_read() -> None:
    cfg = parse_config(
        BASE + "[streams.motion]\nenabled = true\nthreshold = 30\nmin_area = 0.05\n"
        'max_skip_s = 5\nwidth = 96\non_skip = "repeat"\ncheck_every = 30\n\n'
        '[batching]\nmode = "auto"\n'
    )
    motion = cfg.streams[0].motion
    assert motion.enabled and motion.threshold == 30 and motion.min_area == 0.05
    assert motion.max_skip_s == 5.0 and motion.width == 96 and motion.on_skip == "repeat"
    assert motion.check_every == 30
    every_frame = parse_config(BASE + "[streams.motion]\ncheck_every = 1\n")
    assert every_frame.streams[0].motion.check_every == 1
    assert cfg.batching.mode == "auto"


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        ("threshold = 0", r"agent.toml:\d+: .*threshold.*>= 1"),
        ("threshold = 256", r"threshold.*<= 255"),
        ("min_area = 0", r"min_area.*> 0"),
        ("min_area = 1.5", r"min_area.*<= 1"),
        ("max_skip_s = 0", r"max_skip_s.*> 0"),
        ("max_skip_s = 61", r"max_skip_s.*<= 60"),
        ("width = 8", r"width.*>= 16"),
        ('on_skip = "last"', r"on_skip.*'nothing', 'repeat'"),
        (
            "check_every = 0",
            r"agent.toml:8: streams\[0\]\.motion\.check_every must be in 1-30 .*got 0",
        ),
        (
            "check_every = 31",
            r"check_every must be in 1-30 \(frames; 1 = compare every frame\), got 31",
        ),
        ("check_every = 2.5", r"agent.toml:8: streams\[0\]\.motion\.check_every: Expected `int`"),
        ("treshold = 20", r"agent.toml:8: unknown key 'treshold' in streams\[0\].motion"),
    ],
)
def test_bad_motion_keys_are_named(lines: str, fragment: str) -> None:
    text = BASE + f"[streams.motion]\n{lines}\n"
    with pytest.raises(ConfigError, match=fragment):
        parse_config(text, source="agent.toml")


def test_max_skip_must_stay_below_the_watchdog_stall() -> None:
    text = (
        "[watchdog]\nstall_s = 5\n\n" + BASE + "[streams.motion]\nenabled = true\nmax_skip_s = 5\n"
    )
    text = 'device_id = "cam-01"\n' + text.replace('device_id = "cam-01"\n', "")
    with pytest.raises(ConfigError, match=r"max_skip_s 5 must be below watchdog.stall_s 5"):
        parse_config(text, source="agent.toml")
    parse_config(text.replace("max_skip_s = 5", "max_skip_s = 4.5"))  # below: accepted


@pytest.mark.parametrize(
    ("lines", "fragment"),
    [
        (
            'mode = "on"',
            r"agent.toml:4: batching.mode must be one of 'always', 'auto', 'off', got 'on'",
        ),
        ("enabled = true", r"unknown key 'enabled' in batching"),
        ("max_wait_ms = 0", r"max_wait_ms.*>= 1"),
        ("max_wait_ms = 500", r"max_wait_ms.*<= 200"),
    ],
)
def test_bad_batching_keys_are_named(lines: str, fragment: str) -> None:
    text = 'device_id = "cam-01"\n\n[batching]\n' + lines + "\n\n" + BASE.split("\n", 1)[1]
    with pytest.raises(ConfigError, match=fragment):
        parse_config(text, source="agent.toml")
