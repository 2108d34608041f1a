"""`make demo` runs `python -m tools.demo`: the whole story, checked end to end."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.slow


def test_demo_tells_the_rollout_and_the_automatic_rollback(tmp_path: Path) -> None:
    env = dict(os.environ, PATH=os.environ.get("PATH", "") + ":/usr/sbin")
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.demo",
            "--dir",
            str(tmp_path / "demo"),
            "--seconds",
            "3",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
        check=False,
    )
    out = re.sub(r"\x1b\[[0-9;]*m", "", result.stdout + result.stderr)
    assert result.returncode == 0, out[-4000:]
    # The fleet comes up, one device goes offline and comes back.
    assert "demo-cam-3 offline: True" in out and "demo-cam-3 online again: True" in out
    # The INT8 model goes out in two stages, every device hot-swaps it.
    assert "rollout 1 completed: blazeface-short-int8@1.0.0 on 3 executions, 0 failed" in out
    for device in ("demo-cam-1", "demo-cam-2", "demo-cam-3"):
        assert f"{device} now runs blazeface-short-int8@1.0.0" in out
    # Every device showed the gate's evidence in words before committing the INT8 model.
    assert out.count("agrees with the current model on 100.0% of boxes (95% CI") >= 3
    # The broken build is refused by the canary's health gate and never reaches the others.
    assert "demo-cam-1 ota.failed [shadow_agreement]" in out
    assert "agrees with the current model on 0.0% of boxes" in out
    # The expected abort is the story's success, told as such; `error:` is for real errors.
    assert "rollout 2 aborted as intended (stage_failed): stage 1: 1 of 1" in out
    errors = [line for line in out.splitlines() if line.strip().startswith("error:")]
    assert not errors, errors
    assert "demo-cam-2 now runs blazeface-short-int8@1.1.0" not in out
    assert "demo-cam-3 ota.downloading" not in out.split("Rolling out 1.1.0")[1]
    assert "never reached the others" in out
