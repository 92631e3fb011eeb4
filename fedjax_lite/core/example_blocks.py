"""How many of a client's examples go through the model at once, where a loop takes all.

Evaluation (:mod:`fedjax_lite.core.evaluate`) and FedSGD's full-batch gradient
(:mod:`fedjax_lite.algorithms.fedsgd`) use every example of a client in one call, vmapped
over a chunk of K clients padded to N examples: K * N examples in flight. For a linear
model that costs little; for a CNN it does not: evaluating the 28x28 cnn of
:mod:`fedjax_lite.models.cnn` on 64 clients of 64 examples took 5.1 GB of XLA temporaries
(5.9 GB peak RSS), so the CPU runner's evaluation chunk of 256 FEMNIST-sized clients of 128
padded test examples would want ~40 GB. Those loops therefore take each client's examples
in blocks of B: a ``lax.scan`` carrying the sums, B the largest count for which K * B
examples' intermediate values fit :data:`ACTIVATION_BUDGET`, as estimated from the model's
jaxpr on one example (the cnn: ~2.7 MB an example). The same evaluation then took 0.23 GB
of temporaries (0.73 GB peak RSS). When all N fit (linear models, small clients), B = N
and the computation is the one-call one, unchanged (bitwise: checked for a linear model's
FedSGD rounds and evaluation). Blocks only reassociate the sums.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax

ACTIVATION_BUDGET = 1 << 30     # bytes of intermediate values a chunk may hold at once


def intermediate_bytes(fn: Callable, *args) -> int:
    """Bytes of the values all equations of ``fn(*args)``'s jaxpr produce, sub-jaxprs
    included: what it would hold if nothing were fused or freed (an upper bound)."""

    def walk(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            total += sum(v.aval.size * v.aval.dtype.itemsize for v in eqn.outvars
                         if hasattr(v.aval, "dtype") and hasattr(v.aval, "size"))
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)
                    if hasattr(sub, "eqns"):
                        total += walk(sub)
        return total

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def abstract(tree):
    """``tree``'s arrays (or tracers) as ShapeDtypeStructs, for :func:`block_size`."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(jnp.shape(a), jnp.result_type(a)),
                        tree)


def block_size(per_example: Callable, example_args: tuple, num_examples: int, clients: int,
               factor: float = 1.0) -> int:
    """Examples per block for ``clients`` clients of ``num_examples`` each, at
    ``factor`` x :func:`intermediate_bytes` of ``per_example(*example_args)`` (ONE example)
    per example; between 1 and ``num_examples``."""
    cost = factor * max(intermediate_bytes(per_example, *example_args), 1)
    return int(max(1, min(num_examples, ACTIVATION_BUDGET // (max(clients, 1) * cost))))


def sum_over_blocks(fn: Callable, arrays: tuple, block: int):
    """``fn(*arrays)`` (a pytree of sums over the examples) computed in blocks of
    ``block`` examples along the arrays' leading axis and added up: one call when
    ``block`` covers them all, else a ``lax.scan`` over blocks (the arrays are padded with
    zeros to whole blocks: a mask among them must be boolean, so padding is False)."""
    N = arrays[0].shape[0]
    if block >= N:
        return fn(*arrays)
    blocks = -(-N // block)
    pad = lambda a: jnp.concatenate([a, jnp.zeros((blocks * block - N,) + a.shape[1:],
                                                  a.dtype)])
    stacked = [pad(a).reshape((blocks, block) + a.shape[1:]) for a in arrays]
    zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype),
                         jax.eval_shape(fn, *(a[0] for a in stacked)))

    def body(total, xs):
        return jax.tree.map(jnp.add, total, fn(*xs)), None

    return lax.scan(body, zeros, stacked)[0]


__all__ = ["ACTIVATION_BUDGET", "abstract", "block_size", "intermediate_bytes",
           "sum_over_blocks"]
