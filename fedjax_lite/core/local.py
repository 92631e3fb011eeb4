"""Local training: one client's step, written once, run for a chunk of clients.

Epoch e walks the client's example order (a random permutation of its ``n`` real
examples, from :mod:`fedjax_lite.core.shuffle`) in minibatches of ``batch_size``:
``ceil(n / batch_size)`` steps, the last possibly partial. Data are padded to a common
length N, so every client scans over ``ceil(N / batch_size)`` step slots; slots past the
client's own step count, and whole epochs past its ``num_epochs``, are *skipped*:
parameters and optimizer state are carried through unchanged, so a padded client ends
exactly where it would unpadded, under any optax optimizer (momentum, Adam, schedules).

:func:`local_train_chunk` is the engine's loop: a ``lax.scan`` over epochs and steps
whose body is ``jax.vmap`` of ONE client's step, and which gathers each step's
minibatch rows itself. Steps outside and clients inside keeps a chunk's working set
small and in cache on CPUs (measured 4-7x faster on this project's 2-core CPU than
``vmap`` of a whole client's training); it is the same math as
``vmap(local_train)``. :func:`local_train` is the one-client view.

Skipping costs nothing when a whole chunk is done: step slots past the chunk's largest
step count, and epochs past its largest ``num_epochs``, are not run at all (a
``lax.cond`` on a chunk-wide scalar), so a chunk of small clients from a skewed
population (sizes lognormal, padded to the largest client) does not pay for the
padding. :func:`~fedjax_lite.core.round.map_cohort` groups clients of similar size into
the same chunk to make that count.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax
from jax import lax

Params = Any
# loss_fn(params, x[B, ...], y[B], mask[B], *extra) -> (objective, data_loss): the
# objective is differentiated (it may add a proximal or control-variate term); data_loss
# is reported. ``extra`` are the client's own arrays (e.g. control variates).
LossFn = Callable[..., tuple[jax.Array, jax.Array]]


class LocalStats(NamedTuple):
    loss_sum: jax.Array   # sum over steps of batch data loss x real examples in the batch
    examples: jax.Array   # real examples processed (over all epochs)
    steps: jax.Array      # optimizer steps taken


# the vmap axis name of a sweep's members (fedjax_lite.experiment.sweep_group)
MEMBERS_AXIS = "members"


def across_members(x: jax.Array) -> jax.Array:
    """The max of ``x`` over a sweep's members when traced under their vmap, else x."""
    try:
        return lax.pmax(x, MEMBERS_AXIS)
    except NameError:                       # not inside a members vmap
        return x


def tree_where(cond: jax.Array, a, b):
    return jax.tree.map(lambda u, v: jnp.where(cond, u, v), a, b)


def local_train_chunk(loss_fn: LossFn, tx: optax.GradientTransformation, params: Params,
                      x: jax.Array, y: jax.Array, n: jax.Array, orders: jax.Array, *,
                      local_epochs: int, batch_size: int,
                      num_epochs: jax.Array | None = None, extra: tuple = (),
                      unroll: int = 4, per_client_params: bool = False,
                      row_leaves: tuple[str, ...] = (), row_sgd_lr: float | None = None
                      ) -> tuple[Params, LocalStats]:
    """Local training of K clients, all starting from ``params`` (or, with
    ``per_client_params``, each from its own row of ``params``: leading axis K -- e.g. a
    recommender's client starts from its private user factors and its items' rows).

    Args:
      loss_fn: see :data:`LossFn`.
      tx: the client optimizer; its state starts fresh (``tx.init``) every round.
      params: the starting (server) parameters, shared by the K clients.
      x, y, n: the clients' padded examples [K, N, ...], labels [K, N], counts int[K].
      orders: int32[E, N, K] (client axis minor), epoch e's example order of each client,
        real examples first (:func:`~fedjax_lite.core.shuffle.epoch_orders_lanes`).
      local_epochs: E, the static number of epoch slots; ``num_epochs`` int[K] (<= E)
        lets clients run fewer (stragglers). ``batch_size >= n``: one full-batch step.
      extra: per-client pytrees with leading axis K, passed to ``loss_fn``.
      unroll: unroll factor of the step scan (speed only).
      row_leaves, row_sgd_lr: a sparse step for plain SGD (``tx`` must be
        ``optax.sgd(row_sgd_lr)`` without momentum). ``params`` is a dict whose leaves
        named in ``row_leaves`` have one row per example slot ([N, ...] per client; e.g. a
        recommender's rows of the items it rated) and ``x`` holds slot ids: a step
        gathers the batch's B rows, differentiates the loss on them (called with
        ``x = arange(B)`` and the gathered rows in place of the tables) and
        scatter-adds ``-row_sgd_lr * grad`` to those rows only; the other leaves take the
        ``tx`` step. SGD leaves rows outside the batch unchanged, so this is the dense
        step's arithmetic at O(B) instead of O(N) per step (equal to float rounding:
        XLA fuses the two graphs differently; 1-ulp differences measured).

    Returns:
      (params with leading axis K, LocalStats of int/float[K]).
    """
    K, N = x.shape[:2]
    E = local_epochs
    B = min(batch_size, N)
    S = -(-N // B)                                    # step slots per epoch
    if S * B > N:                                     # pad the orders to whole batches
        orders = jnp.concatenate(
            [orders, jnp.zeros((E, S * B - N, K), orders.dtype)], axis=1)
    batches = orders.reshape(E, S, B, K).transpose(0, 1, 3, 2)        # [E, S, K, B]
    real = jnp.arange(S * B).reshape(S, 1, B) < n[None, :, None]      # [S, K, B]
    step_on = real[:, :, 0]                           # step s runs iff s*B < n: [S, K]
    epochs_to_run = jnp.full_like(n, E) if num_epochs is None else num_epochs
    # Chunk-wide bounds: slots and epochs no client of the chunk uses are not run.
    # Under a sweep's vmap over members, a bound that differs between members would turn
    # the lax.conds below into selects that run every slot; the max over the members
    # keeps them conds (the extra slots are masked no-ops for the members not using them).
    chunk_steps = across_members(-(-jnp.max(n) // B))
    chunk_epochs = across_members(jnp.max(jnp.where(n > 0, epochs_to_run, 0)))
    rows = jnp.arange(K).reshape(K, 1)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def client_step(p, opt_state, xb, yb, mb, on, *client_extra):
        """ONE client's minibatch step (skipped when ``on`` is False)."""
        (_, data_loss), grads = grad_fn(p, xb, yb, mb, *client_extra)
        updates, new_opt_state = tx.update(grads, opt_state, p)
        new_p = optax.apply_updates(p, updates)
        k = jnp.where(on, jnp.sum(mb), 0).astype(jnp.float32)
        stats = LocalStats(jnp.where(on, data_loss, 0.0) * k, k, on.astype(jnp.int32))
        return tree_where(on, new_p, p), tree_where(on, new_opt_state, opt_state), stats

    def row_loss(rest, rows, b, yb, mb, *client_extra):
        return loss_fn({**rest, **rows}, b, yb, mb, *client_extra)

    row_grad = jax.value_and_grad(row_loss, argnums=(0, 1), has_aux=True)

    def client_row_step(p, opt_state, xb, yb, mb, on, *client_extra):
        """ONE client's sparse SGD step: only the batch's rows of ``row_leaves`` move."""
        rest = {name: v for name, v in p.items() if name not in row_leaves}
        rows = {name: p[name][xb] for name in row_leaves}
        (_, data_loss), (g_rest, g_rows) = row_grad(
            rest, rows, jnp.arange(xb.shape[0], dtype=xb.dtype), yb, mb, *client_extra)
        updates, new_opt_state = tx.update(g_rest, opt_state, rest)
        new_rest = tree_where(on, optax.apply_updates(rest, updates), rest)
        step = jnp.where(on, -row_sgd_lr, 0.0)
        new_rows = {name: p[name].at[xb].add((step * g_rows[name]).astype(p[name].dtype))
                    for name in row_leaves}
        k = jnp.where(on, jnp.sum(mb), 0).astype(jnp.float32)
        stats = LocalStats(jnp.where(on, data_loss, 0.0) * k, k, on.astype(jnp.int32))
        return ({**new_rest, **new_rows}, tree_where(on, new_opt_state, opt_state), stats)

    if row_leaves:
        if row_sgd_lr is None or not isinstance(params, dict):
            raise ValueError("local_train_chunk: row_leaves needs dict params and "
                             "row_sgd_lr (the plain SGD learning rate of tx)")

    cohort_step = jax.vmap(client_row_step if row_leaves else client_step)

    def run_step(carry, batch, mb, on):
        p, opt_state, stats, e = carry
        on = on & (e < epochs_to_run)
        p, opt_state, s = cohort_step(p, opt_state, x[rows, batch], y[rows, batch], mb, on,
                                      *extra)
        return p, opt_state, jax.tree.map(jnp.add, stats, s), e

    def step(carry, inputs):
        slot, batch, mb, on = inputs                  # [], [K, B], [K, B], [K]
        return lax.cond(slot < chunk_steps, run_step, lambda c, *_: c,
                        carry, batch, mb, on), None

    def run_epoch(carry, epoch_batches):
        carry, _ = lax.scan(step, carry, (jnp.arange(S), epoch_batches, real, step_on),
                            unroll=min(unroll, S))
        return carry

    def epoch(carry, epoch_batches):
        e = carry[3]
        p, opt_state, stats, _ = lax.cond(e < chunk_epochs, run_epoch, lambda c, _: c,
                                          carry, epoch_batches)
        return (p, opt_state, stats, e + 1), None

    p0 = params if per_client_params else jax.tree.map(
        lambda a: jnp.broadcast_to(a, (K,) + a.shape), params)
    zeros = jnp.zeros_like(n)    # derived from n, so it is device-varying under shard_map
    stats0 = LocalStats(zeros.astype(jnp.float32), zeros.astype(jnp.float32), zeros)
    opt_init = (lambda q: tx.init({k: v for k, v in q.items() if k not in row_leaves})
                ) if row_leaves else tx.init
    carry = (p0, jax.vmap(opt_init)(p0), stats0, jnp.zeros((), jnp.int32))
    (p, _, stats, _), _ = lax.scan(epoch, carry, batches)
    return p, stats


def row_step(row_sgd_lr: float | None, leaves: tuple[str, ...] = ("item", "item_bias")
             ) -> dict:
    """Keyword arguments of :func:`local_train_chunk` for its sparse SGD step over the
    per-slot row leaves ``leaves`` (a recommender's item rows), or none when the client
    optimizer is not plain SGD (``row_sgd_lr`` None)."""
    return {} if row_sgd_lr is None else {"row_leaves": leaves, "row_sgd_lr": row_sgd_lr}


def local_train(loss_fn: LossFn, tx: optax.GradientTransformation, params: Params,
                x: jax.Array, y: jax.Array, n: jax.Array, orders: jax.Array, *,
                local_epochs: int, batch_size: int, num_epochs: jax.Array | None = None,
                extra: tuple = (), unroll: int = 4) -> tuple[Params, LocalStats]:
    """ONE client's local training: x [N, ...], y [N], n scalar, orders int32[E, N];
    ``num_epochs`` scalar; ``extra`` the client's own pytrees. See
    :func:`local_train_chunk`."""
    one = lambda a: jnp.expand_dims(a, 0)
    p, stats = local_train_chunk(
        loss_fn, tx, params, one(x), one(y), jnp.reshape(n, (1,)),
        jnp.expand_dims(orders, -1), local_epochs=local_epochs, batch_size=batch_size,
        num_epochs=None if num_epochs is None else jnp.reshape(num_epochs, (1,)),
        extra=jax.tree.map(one, extra), unroll=unroll)
    return jax.tree.map(lambda a: a[0], (p, stats))
