"""Which pip extra brings an optional module the controller's model tooling imports.

The controller install (``edgefleet[controller]``) leaves out the inference core's runtime
(numpy, OpenCV, LiteRT), ONNX Runtime and the quantizer; ``model package --golden``,
``model quantize`` and ``model init`` import them when they run. A missing one is reported
as one line naming the extra to install, not as a traceback.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

__all__ = ["OPTIONAL_MODULES", "missing_module_message"]

OPTIONAL_MODULES: Mapping[str, tuple[str, str]] = MappingProxyType(
    {
        "cv2": ("OpenCV (cv2)", "inference"),
        "numpy": ("numpy", "inference"),
        "ai_edge_litert": ("LiteRT (ai-edge-litert)", "inference"),
        "tqdm": ("tqdm", "inference"),
        "onnxruntime": ("ONNX Runtime (onnxruntime)", "onnx"),
        "ai_edge_quantizer": ("ai-edge-quantizer", "quantize"),
    }
)
"""Top-level module → (what it is, the edgefleet extra that installs it)."""


def missing_module_message(err: ImportError) -> str | None:
    """One line naming the extra for a missing optional module; None for any other import."""
    root = (err.name or "").partition(".")[0]
    known = OPTIONAL_MODULES.get(root)
    if known is None:
        return None
    what, extra = known
    return (
        f"this command needs {what}, which is not installed here: "
        f"pip install 'edgefleet[{extra}]' (the controller install leaves it out)"
    )
