"""No noise on every run: LiteRT's XNNPACK INFO line and alembic's INFO lines."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from inference import ASSETS_DIR

XNNPACK = "Created TensorFlow Lite XNNPACK delegate"


def _python(code: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_agent_infer_prints_no_xnnpack_line(tmp_path: Path) -> None:
    out = tmp_path / "out.jsonl"
    proc = _python(
        "from agent.cli import main; main()",
        "infer",
        "-m",
        str(ASSETS_DIR / "blazeface-short-int8.json"),
        str(ASSETS_DIR / "face-walk-640x480.mp4"),
        "--jsonl",
        str(out),
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr
    assert XNNPACK not in proc.stderr
    assert "150 frames from 1 file(s)" in proc.stderr  # the summary still reaches stderr
    assert len(out.read_text().splitlines()) == 150


def test_quieting_keeps_other_native_stderr_and_restores_fd_2() -> None:
    """Only the noise line is dropped; what else fd 2 got meanwhile is written back, in order."""
    code = """
import os, sys
from inference.backends.native_log import quiet_native_stderr
sys.stderr.write("before\\n")
with quiet_native_stderr():
    os.write(2, b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU.\\n")
    os.write(2, b"ERROR: a real native error\\n")
    sys.stderr.write("python line\\n")
os.write(2, b"after\\n")
"""
    proc = _python(code)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == "before\nERROR: a real native error\npython line\nafter\n"


_DB_UPGRADE = """
import logging, sys
logging.basicConfig(level=logging.INFO)  # as `edgefleet controller serve` does
from controller.cli import main
main(sys.argv[1:])
"""


def test_db_upgrade_logs_no_alembic_info_unless_verbose(tmp_path: Path) -> None:
    quiet = _python(_DB_UPGRADE, "db", "upgrade", "--db", f"sqlite:///{tmp_path / 'a.db'}")
    assert quiet.returncode == 0, quiet.stderr
    assert "is at revision" in quiet.stdout
    assert "INFO:alembic" not in quiet.stderr, quiet.stderr
    verbose = _python(_DB_UPGRADE, "-v", "db", "upgrade", "--db", f"sqlite:///{tmp_path / 'b.db'}")
    assert verbose.returncode == 0, verbose.stderr
    assert "INFO:alembic.runtime.migration:Running upgrade" in verbose.stderr
