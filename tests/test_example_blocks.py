"""core.example_blocks: a client's examples in bounded blocks where evaluation and
FedSGD's full-batch gradient took them all at once; the blocked results equal the
one-call ones (budget forced to 1 byte: one example per client per block)."""

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.core import EngineOptions, build_evaluate, example_blocks
from fedjax_lite.models import multinomial_logistic_regression
from test_flax_models import BLOCKED_CASE, CLASSES, run_case, tiny_cnn, tiny_cnn_params


def test_sum_over_blocks_and_block_size():
    """Sums over blocks of 3 (with a zero-padded last block) equal one call; a block
    never exceeds the examples nor drops below one; the per-example cost counts the
    intermediate values (here a [4] and a [] array of float32: 20 bytes)."""
    x = jnp.arange(10.0)
    mask = x < 8
    fn = lambda x, m: (jnp.sum(jnp.where(m, x, 0.0)), jnp.sum(m))
    whole = fn(x, mask)
    for block in (1, 3, 10, 64):
        np.testing.assert_allclose(example_blocks.sum_over_blocks(fn, (x, mask), block),
                                   whole)
    per, one = lambda e: jnp.sum(jnp.full((4,), e)), jax.ShapeDtypeStruct((), jnp.float32)
    assert example_blocks.intermediate_bytes(per, one) == 20
    assert example_blocks.block_size(per, (one,), 7, 1) == 7
    budget = example_blocks.ACTIVATION_BUDGET
    assert example_blocks.block_size(per, (one,), 10 ** 9, 1) == budget // 20
    assert example_blocks.block_size(per, (one,), 10 ** 9, 10 ** 9) == 1


def test_evaluation_in_blocks_and_layouts_agree(monkeypatch):
    """core.evaluate on a test population of 5 clients: the 8x8 images stored flat
    [K, N, 64] and evaluated whole, and stored [K, N, 8, 8, 1] and evaluated in blocks
    of one example per client (a budget of 1 byte), give the same metrics. A linear
    model's clients fit the real budget in one block."""
    model, params = tiny_cnn(), tiny_cnn_params()
    rng = np.random.default_rng(6)
    n = np.array([7, 1, 0, 4, 7], np.int32)
    x = rng.uniform(size=(5, 7, 8, 8)).astype(np.float32)
    data = {"y": jnp.asarray(rng.integers(0, CLASSES, (5, 7)), jnp.int32),
            "n": jnp.asarray(n)}
    evaluate = build_evaluate(model, EngineOptions(chunk_size=2))
    linear = multinomial_logistic_regression(64, CLASSES)
    assert example_blocks.block_size(
        lambda p, e: linear.apply(p, e[None]),
        (linear.init(None), jax.ShapeDtypeStruct((64,), jnp.float32)), 1024, 256) == 1024
    whole = jax.jit(evaluate)(params, {**data, "x": jnp.asarray(x.reshape(5, 7, 64))})
    monkeypatch.setattr(example_blocks, "ACTIVATION_BUDGET", 1)
    blocked = jax.jit(evaluate)(params, {**data, "x": jnp.asarray(x[..., None])})
    for key, value in whole.items():
        np.testing.assert_allclose(blocked[key], value, rtol=1e-6, err_msg=key)
    assert 0 < float(whole["eval_loss"]) < 10


def test_fedsgd_full_batch_gradient_in_blocks(monkeypatch):
    """The fedsgd case rerun with a 1-byte budget (its clients' gradients accumulated
    one example at a time): the same states (the DP noise is drawn from the same keys)
    as in one call per client."""
    _, state, losses = run_case(BLOCKED_CASE)
    monkeypatch.setattr(example_blocks, "ACTIVATION_BUDGET", 1)
    _, blocked, blocked_losses = run_case.__wrapped__(BLOCKED_CASE)
    np.testing.assert_allclose(blocked_losses, losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(blocked), jax.tree.leaves(state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
