"""tests/data holds, pixel for pixel, the scikit-image sample photos the tests were written on."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from tests import images

# sha256 of the RGB bytes skimage.data.<name>() returned (scikit-image 0.26), and the shape.
EXPECTED = {
    "astronaut": (
        (512, 512, 3),
        "a8c429c18afa7b0fd5673e598d73a21225d94c864a71bbb3885126fdecb41071",
    ),
    "coffee": ((400, 600, 3), "0ce2b51640b9c95f19617f03eabf40c3f0368589cc1ee1190b70966165ac184f"),
    "rocket": ((427, 640, 3), "3d4435cc745752b7f9724df88c6e18817de3ce7e3d2d71c55f85f7831e68f197"),
    "chelsea": ((300, 451, 3), "416b729128bfb2c3d1eb69bf9b1734a796293abc17939267b2dc94f8a5784031"),
}


@pytest.mark.parametrize("name", images.NAMES)
def test_sample_image_has_the_original_pixels(name: str) -> None:
    rgb = images.image(name)
    shape, digest = EXPECTED[name]
    assert rgb.dtype == np.uint8 and rgb.shape == shape
    assert hashlib.sha256(rgb.tobytes()).hexdigest() == digest
    assert np.array_equal(getattr(images, name)(), rgb)


def test_each_call_returns_a_fresh_writable_array() -> None:
    first = images.astronaut()
    first[:] = 0
    assert images.astronaut().any()


def test_the_sample_photos_stay_small() -> None:
    sizes = {path.name: path.stat().st_size for path in images.DATA.glob("*.png")}
    assert set(sizes) == {f"{name}.png" for name in images.NAMES}
    assert sum(sizes.values()) < 1_500_000  # bytes; 1.39 MB when written


def test_unknown_names_are_refused() -> None:
    with pytest.raises(ValueError, match="no sample image 'moon'"):
        images.image("moon")
