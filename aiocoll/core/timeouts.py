"""Timeouts as every public call takes them: a positive, finite number of seconds.

One check for ``init``, every collective and the stores, so that ``nan``, ``inf``, a negative
number or a string is refused the same way everywhere, before anything is sent: ``nan`` compares
false with everything, so a check like ``timeout <= 0`` let it through, and on the way down it
turned into a deadline that never or always passed depending on who compared it.
"""

from __future__ import annotations

import math
import numbers


def seconds(value: object, what: str = "timeout", *, allow_zero: bool = False) -> float:
    """``value`` as a float number of seconds.

    ``allow_zero``: 0 is accepted (a store's ``get(key, timeout=0)`` checks once and returns).

    Raises:
        ValueError: ``value`` is not a real number (a bool, a string, None...), or is NaN,
            infinite, negative, or zero where zero is not allowed. The message names ``what``.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{what} must be a number of seconds, got {value!r} ({type(value).__name__})")
    result = float(value)
    if math.isnan(result):
        raise ValueError(f"{what} must be a number of seconds, got NaN")
    if math.isinf(result):
        raise ValueError(f"{what} must be finite, got {value!r}")
    if result < 0 or (result == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{what} must be {bound} seconds, got {value!r}")
    return result


__all__ = ["seconds"]
