"""Evaluation of a global model on client-partitioned held-out data."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.core.example_blocks import abstract, block_size, sum_over_blocks
from fedjax_lite.core.round import EngineOptions, make_cohort, map_cohort
from fedjax_lite.models.base import Model


def build_evaluate_sums(model: Model, engine: EngineOptions = EngineOptions(chunk_size=256),
                        *, per_client_params: bool = False) -> Callable:
    """``sums(params, data) -> dict`` of additive sums over the clients of ``data``
    (``{x, y, n}``): example-weighted loss and correct counts, per-client means and
    counts; :func:`finish_evaluate` turns sums (of one population, or added over blocks
    of one) into the metrics. A client's examples go through the model in blocks when
    the chunk's all at once would hold too much memory (a CNN's; not a linear model's:
    :mod:`fedjax_lite.core.example_blocks`).

    ``per_client_params``: ``params`` has a leading axis of one row per client of
    ``data`` (personal models, e.g. Ditto's), and client k is evaluated with row k."""

    def one_client(params, x, y, n, block):
        def client_sums(x, y, mask):
            logits = model.apply(params, x)
            mask = mask.astype(jnp.float32)
            return (jnp.sum(model.loss(logits, y) * mask),
                    jnp.sum((model.predict(logits) == y) * mask))
        return sum_over_blocks(client_sums, (x, y, jnp.arange(x.shape[0]) < n), block)

    def chunk_fn(params):
        def run(x, y, n, *own):  # a chunk, x [K, N, ...]: examples in bounded blocks
            one = jax.ShapeDtypeStruct(x.shape[2:], x.dtype)
            like = jax.tree.map(lambda a: a[0], own[0]) if own else params
            block = block_size(lambda p, e: model.apply(p, e[None]),
                               (abstract(like), one), x.shape[1], x.shape[0])
            if own:            # each client its own row of the params
                return jax.vmap(lambda x, y, n, p: one_client(p, x, y, n, block))(
                    x, y, n, own[0])
            return jax.vmap(lambda x, y, n: one_client(params, x, y, n, block))(x, y, n)
        return run

    def sums(params, data):
        everyone = make_cohort(data, jnp.arange(data["n"].shape[0]))
        shared, own = (None, (params,)) if per_client_params else (params, ())
        loss, correct = map_cohort(chunk_fn(shared), everyone, own, engine)
        n = data["n"].astype(jnp.float32)
        has = n > 0
        per = jnp.maximum(n, 1.0)
        return {"loss": jnp.sum(loss), "correct": jnp.sum(correct), "examples": jnp.sum(n),
                "client_loss": jnp.sum(jnp.where(has, loss / per, 0.0)),
                "client_accuracy": jnp.sum(jnp.where(has, correct / per, 0.0)),
                "clients": jnp.sum(has)}

    return sums


def finish_evaluate(s: dict) -> dict:
    """The metrics from :func:`build_evaluate_sums`'s sums (jnp or NumPy values)."""
    xp = jnp if isinstance(s["loss"], jax.Array) else np
    total = xp.maximum(s["examples"], 1.0)
    num_has = xp.maximum(s["clients"], 1)
    return {
        "eval_loss": s["loss"] / total,
        "eval_accuracy": s["correct"] / total,
        "eval_loss_client_mean": s["client_loss"] / num_has,
        "eval_accuracy_client_mean": s["client_accuracy"] / num_has,
    }


def build_evaluate(model: Model, engine: EngineOptions = EngineOptions(chunk_size=256)
                   ) -> Callable:
    """``evaluate(params, data) -> metrics`` over a population dict ``{x, y, n}``.

    Metrics: ``eval_loss`` / ``eval_accuracy`` -- means over the union of all test
    examples (example-weighted); ``eval_loss_client_mean`` /
    ``eval_accuracy_client_mean`` -- unweighted means of per-client values over clients
    with at least one test example (both conventions appear in FL papers).
    """
    sums = build_evaluate_sums(model, engine)
    return lambda params, data: finish_evaluate(sums(params, data))
