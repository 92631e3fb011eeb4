"""``engine.compile_rounds``: the rounds loop's source of rounds, K per compiled call.

:class:`RoundSource` hands the runner one round at a time -- ``(new_state, metrics,
seconds)`` -- exactly as the per-round loop computes it, but where K rounds fit before the
next evaluation or checkpoint it runs them as ONE program
(:func:`fedjax_lite.core.round.build_rounds`: a ``lax.scan`` that draws each round's key
on the device as the host loop does) and then replays the K rows of metrics. While a
block is being replayed (:attr:`RoundSource.in_block`) the intermediate states exist only
inside the program, so the runner takes no decision that needs them: signals and the
privacy budget are checked at block boundaries, and a block is only started if the budget
allows all its rounds.

A block whose rounds would have stopped the loop -- a Poisson draw over the cohort bound,
a non-finite loss, non-finite parameters -- is thrown away and its rounds are run one by
one from the block's start state, so the runner stops at the same round, with the same
checkpoint and message, as without blocks.
"""

from __future__ import annotations

import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np



def all_finite(tree) -> bool:
    """Whether every entry of every leaf is finite (the runner's divergence test of a
    model it may not judge by a loss over client data)."""
    return all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(tree))


class RoundSource:
    """``next(state, r) -> (new_state, metrics, seconds)`` for round r (0-based).

    step(state, r) -> (state, metrics): one round (the compiled round with round r's
    key; with host storage, on the cohort gathered for round r); block_fn(state, population,
    root, start) or None: the compiled K-round program; boundary(done) -> bool: whether
    the runner evaluates or checkpoints after ``done`` rounds; allow(r, k) -> bool:
    whether rounds r .. r + k - 1 may run without a host decision in between (the
    privacy budget)."""

    def __init__(self, step: Callable, block_fn: Callable | None, block: int,
                 rounds: int, population, root: jax.Array,
                 boundary: Callable[[int], bool], allow: Callable[[int, int], bool],
                 params_checked: bool):
        self.step, self.block_fn, self.K = step, block_fn, block
        self.rounds, self.population, self.root = rounds, population, root
        self.boundary, self.allow = boundary, allow
        self.params_checked = params_checked     # DP runs judge by the model, not the loss
        self._replay: list = []                  # [(metrics row, seconds)] still to hand out
        self._final = None                       # the block's final state
        self._single_until = 0                   # rounds before this run one by one

    @property
    def in_block(self) -> bool:
        """True while rounds of a computed block are being handed out (no host state)."""
        return bool(self._replay)

    def _fits(self, r: int) -> bool:
        K = self.K
        return (self.block_fn is not None and r >= self._single_until
                and r + K <= self.rounds and self.allow(r, K)
                and not any(self.boundary(d) for d in range(r + 1, r + K)))

    def _one(self, state, r: int):
        t = time.perf_counter()
        new_state, metrics = self.step(state, r)
        jax.block_until_ready(new_state)
        return new_state, metrics, time.perf_counter() - t

    def next(self, state, r: int):
        if not self._replay and self._fits(r):
            t = time.perf_counter()
            final, stacked = self.block_fn(state, self.population, self.root, r)
            jax.block_until_ready(final)
            seconds = (time.perf_counter() - t) / self.K
            host = jax.tree.map(np.asarray, stacked)
            bad = (np.any(host.get("sampling_overflow", 0.0) > 0)
                   or (not self.params_checked
                       and not np.all(np.isfinite(host["train_loss"])))
                   or (self.params_checked and not all_finite(final.params)))
            if bad:                 # replay these rounds one by one: the loop stops right
                self._single_until = r + self.K
                return self._one(state, r)
            self._final = final
            self._replay = [({k: v[j] for k, v in host.items()}, seconds)
                            for j in range(self.K)]
        if self._replay:
            metrics, seconds = self._replay.pop(0)
            if self._replay:
                return state, metrics, seconds       # mid-block: no host state
            final, self._final = self._final, None
            return final, metrics, seconds
        return self._one(state, r)


__all__ = ["RoundSource", "all_finite"]
