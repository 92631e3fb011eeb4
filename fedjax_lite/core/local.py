"""One client's local training, written for a single client (vmapped by the round).

Epoch e draws a fresh permutation of the client's ``n`` real examples from its own key
and walks it in minibatches of ``batch_size``: ``ceil(n / batch_size)`` steps, the last
one possibly partial. The data are padded to a common length N, so every client scans
over ``ceil(N / batch_size)`` step slots; slots past the client's own step count (and
whole epochs past ``num_epochs``) are *skipped*: parameters and optimizer state are
carried through unchanged, so a padded client ends exactly where it would unpadded,
under any optax optimizer (momentum, Adam, schedules).

The example orders come from :func:`fedjax_lite.core.shuffle.epoch_orders` (computed
for a chunk of clients at once, see there); they depend only on the client's key and
``n``, never on N, so the shuffle is padding-invariant too (``tests/test_local.py``
checks the whole update end to end).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

Params = Any
# loss_fn(params, x[B, ...], y[B], mask[B]) -> (objective, data_loss): the objective is
# differentiated (it may add a proximal or control-variate term); data_loss is reported.
LossFn = Callable[[Params, jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


class LocalStats(NamedTuple):
    loss_sum: jax.Array   # sum over steps of batch data loss x real examples in the batch
    examples: jax.Array   # real examples processed (over all epochs)
    steps: jax.Array      # optimizer steps taken


def tree_where(cond: jax.Array, a, b):
    return jax.tree.map(lambda u, v: jnp.where(cond, u, v), a, b)


def local_train(loss_fn: LossFn, tx: optax.GradientTransformation, params: Params,
                x: jax.Array, y: jax.Array, n: jax.Array, orders: jax.Array, *,
                local_epochs: int, batch_size: int, num_epochs: jax.Array | None = None,
                unroll: int = 1) -> tuple[Params, LocalStats]:
    """Runs up to ``local_epochs`` epochs of minibatch training for ONE client.

    Args:
      loss_fn: see :data:`LossFn`.
      tx: the client optimizer; its state starts fresh (``tx.init``) every round.
      params: the starting (server) parameters.
      x, y: the client's padded examples, [N, ...] and [N]; n: its real count (scalar).
      orders: int32[local_epochs, N], the example order of each epoch (real examples
        first), from :func:`~fedjax_lite.core.shuffle.epoch_orders`.
      local_epochs: static upper bound on epochs; ``num_epochs`` (traced, <= it) lets a
        client run fewer (stragglers). ``batch_size >= n`` means one full-batch step.
      unroll: unroll factor of the step scan (a CPU speed knob, no effect on results).

    Returns:
      (final params, LocalStats).
    """
    N = x.shape[0]
    B = min(batch_size, N)
    S = -(-N // B)  # step slots per epoch
    pad = S * B - N
    epochs_to_run = local_epochs if num_epochs is None else num_epochs
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    positions = jnp.arange(S * B).reshape(S, B)
    real = positions < n                                   # [S, B] real slot in this epoch
    step_active = real[:, 0]                               # step s runs iff s*B < n

    def epoch(carry, inputs):
        e, perm = inputs
        if pad:
            perm = jnp.concatenate([perm, jnp.zeros((pad,), perm.dtype)])
        xb = x[perm].reshape(S, B, *x.shape[1:])
        yb = y[perm].reshape(S, B)
        epoch_on = e < epochs_to_run

        def step(carry, batch):
            params, opt_state, stats = carry
            xs, ys, ms, on = batch
            on = on & epoch_on
            (_, data_loss), grads = grad_fn(params, xs, ys, ms)
            updates, new_opt_state = tx.update(grads, opt_state, params)
            new_params = optax.apply_updates(params, updates)
            k = jnp.where(on, jnp.sum(ms), 0).astype(jnp.float32)
            stats = LocalStats(stats.loss_sum + jnp.where(on, data_loss, 0.0) * k,
                               stats.examples + k, stats.steps + on.astype(jnp.int32))
            return (tree_where(on, new_params, params),
                    tree_where(on, new_opt_state, opt_state), stats), None

        carry, _ = lax.scan(step, carry, (xb, yb, real, step_active), unroll=min(unroll, S))
        return carry, None

    stats0 = LocalStats(jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32),
                        jnp.zeros((), jnp.int32))
    carry = (params, tx.init(params), stats0)
    epochs = (jnp.arange(local_epochs), orders)
    (params, _, stats), _ = lax.scan(epoch, carry, epochs)
    return params, stats
