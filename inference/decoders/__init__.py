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

from collections.abc import Sequence

from inference.backends.base import TensorInfo
from inference.decoders.base import Box, Decoder, IndexedOutputs, Outputs, RawDetection
from inference.errors import ModelError
from protocol.manifest import BlazeFaceDecoder, DecoderSpec, SsdPostprocessDecoder, YoloDecoder

__all__ = ["Box", "Decoder", "IndexedOutputs", "Outputs", "RawDetection", "make_decoder"]


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
        from inference.decoders.blazeface import BlazeFaceSsdDecoder

        return BlazeFaceSsdDecoder(spec, labels, backend_outputs_info, input_size=input_size)
    if isinstance(spec, SsdPostprocessDecoder):
        from inference.decoders.ssd_postprocess import SsdPostprocessOutputDecoder

        return SsdPostprocessOutputDecoder(spec, labels, backend_outputs_info)
    if isinstance(spec, YoloDecoder):
        from inference.decoders.yolo import YoloRawDecoder

        return YoloRawDecoder(spec, labels, backend_outputs_info, input_size=input_size)
    raise ModelError(f"unsupported decoder {type(spec).__name__}")  # pragma: no cover
