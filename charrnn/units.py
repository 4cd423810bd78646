"""Loss units: the models work in nats per character; people compare bits per character."""

from __future__ import annotations

import math

LN2 = math.log(2.0)


def bits(nats: float | None) -> float | None:
    """Nats per character as bits per character (None stays None: no value yet)."""
    return None if nats is None else nats / LN2
