"""``edgefleet-agent``: the device daemon's command line.

Only AgentError is caught and shown as one line (exit 2); ``-v`` adds the traceback.

``run`` exits 0 after SIGTERM/SIGINT or when every (file) source ended, 2 on a config or
startup error, 3 (``agent.app.EXIT_STREAMS_FAILED``) when the agent stopped on its own
because no stream can deliver frames and one failed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import NoReturn

import click

from agent import __version__
from agent.errors import AgentError
from inference.errors import InferenceError

# OpenCV/FFmpeg print native warnings for every failed camera open; the agent reports
# source trouble itself (status, events, one log line per state change).
os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")


def _setup_logging(level: str, verbose: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if verbose else getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)-7s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def _end_process(code: int) -> NoReturn:
    """Exit with ``code`` after ``run``'s clean shutdown (logs, spool and MQTT flushed).

    A thread still running now may sit inside a native call (OpenCV/FFmpeg waiting on a
    camera until its timeout). Were the interpreter to finalize meanwhile, that call's return
    would end the thread by a forced unwind through C++ frames: "terminate called without an
    active exception" / "FATAL: exception not rethrown", SIGABRT. So with such a thread the
    process ends at once, after flushing what the interpreter would have flushed.
    """
    others = [t.name for t in threading.enumerate() if t is not threading.main_thread()]
    if not others:
        sys.exit(code)
    logging.getLogger("agent").info(
        "threads still running after the shutdown (%s); ending the process now",
        ", ".join(sorted(others)),
    )
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _fail(err: AgentError | InferenceError, verbose: bool) -> None:
    if verbose:
        logging.getLogger("agent").exception("failed")
    click.secho(f"error: {err}", fg="red", err=True)
    sys.exit(2)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="edgefleet-agent")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging and tracebacks on errors.")
@click.pass_context
def main(ctx: click.Context, verbose: bool) -> None:
    """edgefleet device agent: camera → detector → MQTT."""
    ctx.obj = {"verbose": verbose}


@main.command()
@click.option(
    "-c",
    "--config",
    "config_path",
    type=click.Path(path_type=Path),
    default=Path("/etc/edgefleet/agent.toml"),
    show_default=True,
)
@click.pass_context
def run(ctx: click.Context, config_path: Path) -> None:
    """Run the daemon until SIGTERM/SIGINT (exit 0); exit 3 when every stream stopped and
    one had failed."""
    # From here on a SIGTERM stops the agent cleanly, also while it still starts up.
    stop = threading.Event()

    def early_stop(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, early_stop)
    signal.signal(signal.SIGINT, early_stop)

    from agent.app import AgentApp
    from agent.config import load_config

    verbose = ctx.obj["verbose"]
    try:
        loaded = load_config(config_path)
        _setup_logging(loaded.config.log_level, verbose)
        code = AgentApp(loaded, stop=stop).run()
    except (AgentError, InferenceError) as err:
        if verbose:
            logging.getLogger("agent").exception("failed")
        click.secho(f"error: {err}", fg="red", err=True)
        code = 2
    except Exception:  # a bug: the traceback, then the same careful exit
        logging.getLogger("agent").exception("the agent failed unexpectedly")
        code = 1
    _end_process(code)


@main.command("check-config")
@click.argument("config_path", type=click.Path(path_type=Path))
@click.pass_context
def check_config(ctx: click.Context, config_path: Path) -> None:
    """Validate a config file and the models it names; exit 2 on the first problem."""
    from agent.config import check_sources, deprecations, load_config, resolve_model
    from agent.errors import ConfigError
    from agent.ota.bundle import key_id, load_trusted_keys
    from inference.detector import load_detector

    try:
        loaded = load_config(config_path)
        problems, source_warnings = check_sources(loaded)
        if problems:
            raise ConfigError(f"{config_path}: " + f"\n{config_path}: ".join(problems))
        base = config_path.resolve().parent
        for s in loaded.config.streams:
            detector = load_detector(resolve_model(s.model, base), backend=s.backend, threads=1)
            click.echo(
                f"stream {s.name}: {detector.ref} via {detector.backend_name}, source {s.source}"
            )
            detector.close()
        ota = loaded.config.ota
        keys = load_trusted_keys([loaded.resolve(k) for k in ota.trusted_keys])
        if not ota.enabled:
            click.echo("ota: disabled (the desired state is ignored)")
        elif keys:
            click.echo(f"ota: trusted keys {', '.join(key_id(k) for k in keys)}")
        else:
            click.secho("ota: no trusted_keys: every model update will be refused", fg="yellow")
        for warning in [*source_warnings, *deprecations(loaded.config)]:
            click.secho(f"warning: {warning}", fg="yellow")
    except (AgentError, InferenceError) as err:
        _fail(err, ctx.obj["verbose"])
    click.secho(f"{config_path}: OK", fg="green")


@main.command()
@click.option(
    "-m",
    "--model",
    required=True,
    help="Model manifest (.json), a model file (.tflite/.onnx) with its manifest beside it, "
    "or builtin:NAME.",
)
@click.argument("sources", nargs=-1, required=True)
@click.option(
    "--jsonl",
    "out",
    type=click.Path(path_type=Path),
    required=True,
    help="Output file, one JSON line per frame ('-' for stdout).",
)
@click.option(
    "--backend", type=click.Choice(["litert", "tflite", "onnx", "tensorrt"]), default=None
)
@click.option("--threads", type=int, default=None, help="Inference threads (default: all cores).")
@click.option("--min-score", type=float, default=None)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.pass_context
def infer(
    ctx: click.Context,
    model: str,
    sources: tuple[str, ...],
    out: Path,
    backend: str | None,
    threads: int | None,
    min_score: float | None,
    no_progress: bool,
) -> None:
    """Offline batch inference over image files, folders and videos."""
    from inference.batch import run_batch

    _setup_logging("warning", ctx.obj["verbose"])
    try:
        summary = run_batch(
            model=model,
            sources=list(sources),
            out=out,
            backend=backend,
            threads=threads,
            min_score=min_score,
            progress=not no_progress,
        )
    except (AgentError, InferenceError) as err:
        _fail(err, ctx.obj["verbose"])
    click.echo(summary, err=True)


if __name__ == "__main__":  # pragma: no cover
    main()
