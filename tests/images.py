"""Sample photos for the tests, read from tests/data/ (RGB uint8, as scikit-image gave them).

The PNGs hold, pixel for pixel, what ``skimage.data.<name>()`` returned in scikit-image
0.26 (astronaut: NASA, no known copyright restrictions; coffee: Rachel Michetti, CC0;
rocket: SpaceX, public domain; chelsea: Stefan van der Walt, CC0). They were written once with
``cv2.imwrite(f"{name}.png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
[cv2.IMWRITE_PNG_COMPRESSION, 9, cv2.IMWRITE_PNG_STRATEGY, 1])``; PNG is lossless, so the
arrays here equal the originals, and the tests no longer need scikit-image.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import numpy.typing as npt

DATA = Path(__file__).resolve().parent / "data"
NAMES = ("astronaut", "coffee", "rocket", "chelsea")


@functools.cache
def _rgb(name: str) -> npt.NDArray[np.uint8]:
    bgr = cv2.imread(str(DATA / f"{name}.png"), cv2.IMREAD_COLOR)
    if bgr is None:
        raise FileNotFoundError(DATA / f"{name}.png")
    rgb = np.ascontiguousarray(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), dtype=np.uint8)
    rgb.setflags(write=False)  # cached and shared: callers copy before drawing on it
    return rgb


def image(name: str) -> npt.NDArray[Any]:
    """The photo ``name`` (one of NAMES) as an RGB (H, W, 3) uint8 array, like skimage.data."""
    if name not in NAMES:
        raise ValueError(f"no sample image {name!r}; tests/data has {', '.join(NAMES)}")
    return np.array(_rgb(name))


def astronaut() -> npt.NDArray[Any]:
    """512x512 RGB: a face (the detector tests' positive image)."""
    return image("astronaut")


def coffee() -> npt.NDArray[Any]:
    """400x600 RGB: a cup of coffee, no face."""
    return image("coffee")


def rocket() -> npt.NDArray[Any]:
    """427x640 RGB: a rocket launch, no face."""
    return image("rocket")


def chelsea() -> npt.NDArray[Any]:
    """300x451 RGB: a cat, no face."""
    return image("chelsea")
