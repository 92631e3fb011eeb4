"""Evaluation of a global model on client-partitioned held-out data."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from fedjax_lite.core.round import EngineOptions, make_cohort, map_cohort
from fedjax_lite.models.base import Model


def build_evaluate(model: Model, engine: EngineOptions = EngineOptions(chunk_size=256)
                   ) -> Callable:
    """``evaluate(params, data) -> metrics`` over a population dict ``{x, y, n}``.

    Metrics: ``eval_loss`` / ``eval_accuracy`` -- means over the union of all test
    examples (example-weighted); ``eval_loss_client_mean`` /
    ``eval_accuracy_client_mean`` -- unweighted means of per-client values over clients
    with at least one test example (both conventions appear in FL papers).
    """

    def one_client(params, x, y, n):
        logits = model.apply(params, x)
        mask = (jnp.arange(x.shape[0]) < n).astype(jnp.float32)
        loss = jnp.sum(model.loss(logits, y) * mask)
        correct = jnp.sum((model.predict(logits) == y) * mask)
        return loss, correct

    def evaluate(params, data):
        everyone = make_cohort(data, jnp.arange(data["n"].shape[0]))
        loss, correct = map_cohort(
            jax.vmap(lambda x, y, n: one_client(params, x, y, n)), everyone, (), engine)
        n = data["n"].astype(jnp.float32)
        total = jnp.maximum(jnp.sum(n), 1.0)
        has = n > 0
        per = jnp.maximum(n, 1.0)
        num_has = jnp.maximum(jnp.sum(has), 1)
        return {
            "eval_loss": jnp.sum(loss) / total,
            "eval_accuracy": jnp.sum(correct) / total,
            "eval_loss_client_mean": jnp.sum(jnp.where(has, loss / per, 0.0)) / num_has,
            "eval_accuracy_client_mean": jnp.sum(jnp.where(has, correct / per, 0.0)) / num_has,
        }

    return evaluate
