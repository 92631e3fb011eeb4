"""Range checks shared by the config schema's dataclasses: ``field(metadata=_check(
predicate, "what is allowed"))``, read by the parser in
:mod:`fedjax_lite.experiment.config`."""

from __future__ import annotations


def _check(pred, allowed: str) -> dict:
    return {"check": (pred, allowed)}


_POS_INT = _check(lambda v: v > 0, "a positive integer")
_NONNEG_INT = _check(lambda v: v >= 0, "an integer >= 0")
_POS = _check(lambda v: v > 0, "a number > 0")
_NONNEG = _check(lambda v: v >= 0, "a number >= 0")
_FRACTION = _check(lambda v: 0 <= v < 1, "a number in [0, 1)")
SEED_MAX = 2 ** 63 - 1        # seeds are non-negative signed 64-bit integers
_SEED = _check(lambda v: 0 <= v <= SEED_MAX, "an integer in [0, 2**63 - 1]")
