"""Decoders: raw model outputs -> ``(label_index, score, (xmin, ymin, xmax, ymax))``.

The model manifest's ``decoder`` (a tagged union in ``protocol.manifest``) picks one;
``make_decoder`` builds it once per loaded model, resolving output names to indices and
precomputing what it can (anchors, thresholds). Boxes come back normalized to the
*model input* (0..1); mapping to the original frame is the preprocessor's business.

A decoder reads ``outputs[i]`` for ``i`` in its ``output_indices`` (indices into the
backend's outputs), each at most once per call and only when needed (a BlazeFace frame
without a face never reads the box regressors). So ``outputs`` can be the list of all
outputs, a dict holding just those, or a lazy view that fetches from the backend on
access (what the Detector passes). Raw (still quantized) outputs are fine: decoders
dequantize what they keep.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeAlias

import numpy.typing as npt

from agent.backends.base import TensorInfo
from agent.errors import ModelError
from protocol.manifest import BlazeFaceDecoder, DecoderSpec, SsdPostprocessDecoder, YoloDecoder

__all__ = ["Box", "Decoder", "IndexedOutputs", "Outputs", "RawDetection", "make_decoder"]

Box: TypeAlias = tuple[float, float, float, float]
"""(xmin, ymin, xmax, ymax)."""
RawDetection: TypeAlias = tuple[int, float, Box]
"""(label index, score 0..1, box normalized to the model input)."""


class IndexedOutputs(Protocol):
    def __getitem__(self, index: int, /) -> npt.NDArray[Any]: ...


Outputs: TypeAlias = Sequence[npt.NDArray[Any]] | Mapping[int, npt.NDArray[Any]] | IndexedOutputs


class Decoder(Protocol):
    @property
    def output_indices(self) -> tuple[int, ...]:
        """The backend outputs ``decode`` reads."""
        ...

    def decode(self, outputs: Outputs, min_score: float) -> list[RawDetection]:
        """Detections with score >= ``min_score``, best first, after NMS."""
        ...


def make_decoder(
    spec: DecoderSpec,
    labels: Sequence[str],
    backend_outputs_info: Sequence[TensorInfo],
    *,
    input_size: tuple[int, int] | None = None,
) -> Decoder:
    """The decoder for ``spec``; ``input_size`` is the model input (width, height).

    ``input_size`` is needed by BlazeFace (anchor grid; defaults to ``box_scale``) and by
    YOLO with pixel boxes (``normalized: false``). ModelError when the model's outputs
    do not fit the decoder.
    """
    if not labels:
        raise ModelError("the model manifest lists no labels: add at least one label")
    if isinstance(spec, BlazeFaceDecoder):
        from agent.decoders.blazeface import BlazeFaceSsdDecoder

        return BlazeFaceSsdDecoder(spec, labels, backend_outputs_info, input_size=input_size)
    if isinstance(spec, SsdPostprocessDecoder):
        from agent.decoders.ssd_postprocess import SsdPostprocessOutputDecoder

        return SsdPostprocessOutputDecoder(spec, labels, backend_outputs_info)
    if isinstance(spec, YoloDecoder):
        from agent.decoders.yolo import YoloRawDecoder

        return YoloRawDecoder(spec, labels, backend_outputs_info, input_size=input_size)
    raise ModelError(f"unsupported decoder {type(spec).__name__}")  # pragma: no cover
