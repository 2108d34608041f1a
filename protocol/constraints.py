"""Named value types of the configuration files every party writes (pure msgspec).

Each is an ``Annotated`` type whose ``msgspec.Meta`` carries the bound and a description:
decoding enforces the bound, the exported JSON Schemas carry both, and the config loaders
(``protocol.config_file``) turn a violated bound into "``key`` must be ...".
"""

from __future__ import annotations

from typing import Annotated

from msgspec import Meta

__all__ = [
    "Count",
    "Fraction",
    "ListenPort",
    "Port",
    "PositiveInt",
    "PositiveSeconds",
    "Seconds",
    "WholeSeconds",
]

Port = Annotated[int, Meta(ge=1, le=65535, description="TCP port")]
ListenPort = Annotated[int, Meta(ge=0, le=65535, description="TCP port; 0 = any free port")]
Seconds = Annotated[float, Meta(ge=0, description="duration in seconds")]
PositiveSeconds = Annotated[float, Meta(gt=0, description="duration in seconds")]
WholeSeconds = Annotated[int, Meta(ge=0, description="duration in whole seconds")]
Fraction = Annotated[float, Meta(ge=0, le=1, description="share from 0 to 1")]
Count = Annotated[int, Meta(ge=0, description="count")]
PositiveInt = Annotated[int, Meta(ge=1, description="whole number")]
