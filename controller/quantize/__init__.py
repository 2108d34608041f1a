"""``edgefleet model quantize``: a float TFLite model -> full-integer INT8 (docs/quantize.md).

Steps: the float model (fp32, or fp16 weights) is rewritten to fp32 with a signature and
its RELUs fused into the producing ops (:mod:`controller.tflite_graph`); ai-edge-quantizer
calibrates it on a folder of images, prepared as the agent prepares camera frames (the
manifest's input spec: resize, colour order, layout, ``(pixel - mean) / std``); the input
range and any ``--fix-range`` tensors are then set exactly; weights and activations are
quantized to int8 (static ranges); a uint8 input is put in front so the agent feeds raw
pixels. The output folder gets ``model.tflite`` and ``manifest.json``.

The report compares the two models on golden images through the inference core the agent
runs (:func:`inference.batch.detect_images`): detections are paired per image and agree when the label matches,
IoU >= 0.5 and the scores differ by <= 0.15 — the rule the agent's golden check applies
to a bundle, so an INT8 model that agrees everywhere passes golden samples taken from the
float one.
"""

from controller.quantize.agreement import GoldenComparison, Pair, QuantizeReport, compare_detections
from controller.quantize.inputs import (
    CALIBRATION_EXTS,
    DEFAULT_MAX_IMAGES,
    FixRange,
    QuantizeError,
    parse_fix_range,
    parse_range,
    prepare_image,
)
from controller.quantize.run import quantize_model

__all__ = [
    "CALIBRATION_EXTS",
    "DEFAULT_MAX_IMAGES",
    "FixRange",
    "GoldenComparison",
    "Pair",
    "QuantizeError",
    "QuantizeReport",
    "compare_detections",
    "parse_fix_range",
    "parse_range",
    "prepare_image",
    "quantize_model",
]
