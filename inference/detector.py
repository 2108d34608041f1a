"""A loaded model bundle: manifest + backend + preprocessor + decoder.

``load_detector(manifest_path)`` reads and checks the manifest and the model file (a model
file's path stands for the manifest beside it, see :func:`inference.models.manifest_for`),
loads the model with the manifest's runtime (or the one asked for) and returns a
``Detector``:

- ``preprocess(frame_bgr)`` -> ``Prepared``: thread-safe, meant for the camera thread;
- ``infer(prepared)`` -> ``InferenceResult``: detections with label strings, scores and
  boxes normalized to the original frame; one thread only (the backend is stateful);
- ``detect(frame_bgr)``: both, for tests and one-off use.
"""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import numpy as np
import numpy.typing as npt

from inference.backends import Backend, create_backend, model_family
from inference.decoders import Decoder, make_decoder
from inference.decoders.base import Outputs
from inference.errors import ModelError
from inference.models import manifest_for
from inference.preprocess import Prepared, Preprocessor
from protocol import Detection, Manifest, ProtocolError, decode_manifest

__all__ = ["Detector", "InferenceResult", "Prepared", "load_detector", "read_manifest"]

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class InferenceResult:
    detections: list[Detection]
    """Best first; boxes normalized xyxy in the original frame, clipped to 0..1."""
    infer_ms: float
    """Time spent in the backend's ``invoke()`` alone (wall clock)."""
    cpu_ms: float | None = None
    """CPU time of the invoking thread over ``invoke()``, where the backend computes on that
    thread alone (``Backend.computes_on_caller``); else None. Unlike ``infer_ms`` it leaves out
    the time the thread waited: for a core other processes held, and for the interpreter lock
    that ``invoke()`` released and another thread of the process took meanwhile (up to the
    5 ms switch interval per call), so it compares two models on a busy host (the health
    gate's latency check)."""


class Detector:
    """One model ready to run. ``infer`` is not thread-safe; ``preprocess`` is."""

    def __init__(
        self,
        *,
        manifest: Manifest,
        manifest_path: Path,
        backend_name: str,
        backend: Backend,
        preprocessor: Preprocessor,
        decoder: Decoder,
        min_score: float,
    ) -> None:
        self.manifest = manifest
        self.manifest_path = manifest_path
        self.ref = manifest.ref
        self.backend_name = backend_name
        self.backend = backend
        self.preprocessor = preprocessor
        self.decoder = decoder
        self.min_score = min_score
        self._labels = tuple(manifest.labels)
        self._outputs = _LazyOutputs(backend)

    def preprocess(self, frame_bgr: npt.NDArray[Any]) -> Prepared:
        """The frame as the model's input tensor (thread-safe)."""
        return self.preprocessor(frame_bgr)

    def infer(self, prepared: Prepared, *, min_score: float | None = None) -> InferenceResult:
        backend = self.backend
        backend.set_input(prepared.tensor)
        infer_ms, cpu_ms = backend.timed_invoke()
        return self.decode(self._outputs, prepared, infer_ms, min_score=min_score, cpu_ms=cpu_ms)

    def decode(
        self,
        outputs: Outputs,
        prepared: Prepared,
        infer_ms: float,
        *,
        min_score: float | None = None,
        cpu_ms: float | None = None,
    ) -> InferenceResult:
        """Detections from one frame's raw outputs (as ``backend.output(i)`` gives them);
        :mod:`inference.batching` passes each frame's slice of a batched invoke."""
        raw = self.decoder.decode(outputs, self.min_score if min_score is None else min_score)
        if not raw:
            return InferenceResult(detections=[], infer_ms=infer_ms, cpu_ms=cpu_ms)
        sx, sy = prepared.scale_x, prepared.scale_y
        ox, oy = prepared.offset_x, prepared.offset_y
        labels = self._labels
        detections = []
        for label_index, score, (x0, y0, x1, y1) in raw:
            box = (
                round(min(max(x0 * sx + ox, 0.0), 1.0), 4),
                round(min(max(y0 * sy + oy, 0.0), 1.0), 4),
                round(min(max(x1 * sx + ox, 0.0), 1.0), 4),
                round(min(max(y1 * sy + oy, 0.0), 1.0), 4),
            )
            detections.append(Detection(label=labels[label_index], score=round(score, 4), box=box))
        return InferenceResult(detections=detections, infer_ms=infer_ms, cpu_ms=cpu_ms)

    def detect(self, frame_bgr: npt.NDArray[Any]) -> InferenceResult:
        return self.infer(self.preprocess(frame_bgr))

    def nonfinite_outputs(self) -> list[str]:
        """Names of the last ``infer``'s float outputs holding NaN or infinity (quantized ones
        never do); a few microseconds for a detector head."""
        backend = self.backend
        names = []
        for index, info in enumerate(backend.outputs):
            array = backend.output(index)
            if np.issubdtype(array.dtype, np.floating) and not bool(np.isfinite(array).all()):
                names.append(info.name)
        return names

    def close(self) -> None:
        self.backend.close()

    def __enter__(self) -> Detector:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Detector({self.ref!r}, backend={self.backend_name!r})"


class _LazyOutputs:
    """``outputs[i]`` fetches backend output i when the decoder asks for it."""

    __slots__ = ("_output",)

    def __init__(self, backend: Backend) -> None:
        self._output = backend.output

    def __getitem__(self, index: int, /) -> npt.NDArray[Any]:
        return self._output(index)


def read_manifest(manifest_path: Path) -> Manifest:
    """Read and strictly check a model manifest (or the manifest beside a model file);
    ModelError naming the file otherwise."""
    manifest_path = manifest_for(Path(manifest_path))
    try:
        data = manifest_path.read_bytes()
    except FileNotFoundError as err:
        raise ModelError(
            f"model manifest {manifest_path} not found: check the model path in the config, "
            "or reinstall the model bundle"
        ) from err
    except OSError as err:
        raise ModelError(f"cannot read model manifest {manifest_path}: {err}") from err
    try:
        return decode_manifest(data)
    except ProtocolError as err:
        raise ModelError(
            f"model manifest {manifest_path} is invalid: {err}. Fix the manifest or "
            "reinstall the model bundle"
        ) from err


def _check_files(manifest: Manifest, manifest_path: Path, *, verify: bool) -> None:
    folder = manifest_path.parent
    model_path = folder / manifest.model
    if not model_path.is_file():
        raise ModelError(
            f"model file {model_path} (named in {manifest_path}) not found: "
            "reinstall the model bundle"
        )
    for entry in manifest.files:
        path = folder / entry.path
        try:
            size = path.stat().st_size
        except FileNotFoundError as err:
            raise ModelError(f"bundle file {path} is missing: reinstall the model bundle") from err
        if size != entry.size:
            raise ModelError(
                f"bundle file {path} is {size} bytes but the manifest says {entry.size}: "
                "the file is incomplete or not the one the manifest describes; "
                "re-download or reinstall the model bundle"
            )
        if verify:
            digest = _sha256(path)
            if digest != entry.sha256.lower():
                raise ModelError(
                    f"bundle file {path} has sha256 {digest} but the manifest says "
                    f"{entry.sha256}: the file is corrupt or was changed; re-download or "
                    "reinstall the model bundle"
                )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def load_detector(
    manifest_path: Path,
    *,
    backend: str | None = None,
    threads: int = 1,
    min_score: float | None = None,
    verify: bool = False,
) -> Detector:
    """Load the model bundle described by ``manifest_path`` (or a model file's manifest).

    ``backend`` defaults to the manifest's runtime (``litert`` and ``tflite`` can stand in
    for each other); ``min_score`` defaults to the manifest's; ``verify`` also checks the
    sha256 of every file the manifest lists (sizes are always checked).
    """
    manifest_path = manifest_for(Path(manifest_path))
    manifest = read_manifest(manifest_path)
    folder = manifest_path.parent
    _check_files(manifest, manifest_path, verify=verify)
    name = backend or manifest.runtime
    if model_family(name) != model_family(manifest.runtime):
        raise ModelError(
            f"model {manifest.ref} ({manifest_path}) is a {manifest.runtime} model; the "
            f"{name!r} backend cannot run it: choose the {manifest.runtime!r} backend"
        )
    score = manifest.min_score if min_score is None else min_score
    if not 0.0 <= score <= 1.0:
        raise ModelError(f"min_score must be between 0 and 1, not {score}")
    loaded = create_backend(name, folder / manifest.model, threads=threads)
    try:
        if len(loaded.inputs) != 1:
            raise ModelError(
                f"model {folder / manifest.model} has {len(loaded.inputs)} inputs; "
                "edgefleet runs single-input image models"
            )
        info = loaded.inputs[0]
        preprocessor = Preprocessor(manifest.input, info)
        decoder = make_decoder(
            manifest.decoder,
            manifest.labels,
            loaded.outputs,
            input_size=(manifest.input.width, manifest.input.height),
        )
    except ModelError as err:
        loaded.close()
        raise ModelError(f"{manifest_path}: {err}") from err
    except BaseException:
        loaded.close()
        raise
    log.info(
        "loaded %s from %s with backend %s (%d thread(s), input %s %s, %s path)",
        manifest.ref,
        manifest_path,
        name,
        threads,
        list(info.shape),
        info.dtype,
        preprocessor.mode,
    )
    return Detector(
        manifest=manifest,
        manifest_path=manifest_path,
        backend_name=name,
        backend=loaded,
        preprocessor=preprocessor,
        decoder=decoder,
        min_score=score,
    )
