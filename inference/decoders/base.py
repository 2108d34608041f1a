"""What every decoder shares: the raw detection, the outputs it reads, the protocol."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, TypeAlias

import numpy.typing as npt

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
