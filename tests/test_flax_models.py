"""The flax models (fedjax_lite.models.mlp / cnn): parameter counts against McMahan et al.
(AISTATS 2017, Sec. 3), forward passes (and the cnn's layers' gradients) against float64
NumPy references written here and flax's own layers, input layouts, padding invariance
(masked loss; a whole round of Adam clients), a tiny overfit, every algorithm /
aggregator / engine path on a tiny population, and the config keys (examples in blocks:
tests/test_example_blocks.py, which reuses this module's cases).

CNN compiles are slow on CPU (seconds per program), so: tiny widths wherever the test is
not about the widths, NumPy-drawn parameters where the init is not under test, one
compiled program per test where several checks can share it, and each algorithm case is
one round program run twice (cached for the tests that compare against it).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import yaml

from fedjax_lite.algorithms.fedavg import data_loss
from fedjax_lite.core import build_round, build_rounds, local_train, round_key
from fedjax_lite.experiment import config as cfg
from fedjax_lite.experiment.builders import build_algorithm, build_model, engine_options
from fedjax_lite.models import masked_mean_loss
from fedjax_lite.models.cnn import cnn
from fedjax_lite.models.mlp import mlp

TINY = {"channels": (2, 3), "dense": 8}       # the cnn's layers at tiny widths
CLASSES = 3


@functools.cache
def tiny_cnn():
    return cnn((8, 8), CLASSES, **TINY)


@functools.cache
def tiny_cnn_params(seed: int = 0):
    """The tiny cnn's init (compiling an init costs seconds: its random draws)."""
    return jax.jit(tiny_cnn().init)(jax.random.key(seed))


def numpy_params(model, seed: int):
    """Random float32 parameters of ``model``'s shapes drawn by NumPy (no compile):
    kernels N(0, 1 / fan_in), biases N(0, 0.1^2) (non-zero, so they are tested too)."""
    rng = np.random.default_rng(seed)
    def draw(a):
        scale = 0.1 if a.ndim == 1 else 1.0 / np.sqrt(np.prod(a.shape[:-1]))
        return (scale * rng.normal(size=a.shape)).astype(np.float32)
    return jax.tree.map(draw, jax.eval_shape(model.init, jax.random.key(0)))


def count(model) -> int:
    shapes = jax.eval_shape(model.init, jax.random.key(0))
    return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(shapes))


def layer_shapes(model) -> dict:
    shapes = jax.eval_shape(model.init, jax.random.key(0))["params"]
    return {name: shapes[name]["kernel"].shape for name in shapes}


# ------------------------------------------------------------------ sizes and shapes

def test_parameter_counts_of_both_sizes():
    # McMahan et al., Sec. 3: "CNN ... (1,663,370 total parameters)", "2NN ... (199,210)"
    assert count(cnn((784,), 10)) == 1_663_370
    assert count(cnn((28, 28, 1), 10)) == 1_663_370
    assert count(mlp((784,), (200, 200), 10)) == 199_210
    assert count(cnn((28, 28), 62)) == 1_690_046          # FEMNIST's 62 classes
    assert layer_shapes(cnn((28, 28), 62)) == {
        "Conv_0": (5, 5, 1, 32), "Conv_1": (5, 5, 32, 64), "Dense_0": (7 * 7 * 64, 512),
        "Dense_1": (512, 62)}
    # the scaled design for 8x8 digits: 2x2x32 pooled features into 64 units
    assert count(cnn((8, 8), 10)) == 22_154
    assert layer_shapes(cnn((8, 8), 10)) == {
        "Conv_0": (5, 5, 1, 16), "Conv_1": (5, 5, 16, 32), "Dense_0": (2 * 2 * 32, 64),
        "Dense_1": (64, 10)}
    assert count(mlp((8, 8), (200, 200), 10)) == 55_210
    # the shorter side picks the design (15 = the geometric mean of 8 and 28, rounded up)
    assert layer_shapes(cnn((15, 40), 10))["Conv_0"] == (5, 5, 1, 32)
    assert layer_shapes(cnn((14, 40), 10))["Conv_0"] == (5, 5, 1, 16)
    # overrides
    assert layer_shapes(cnn((28, 28), 10, channels=(4, 6), dense=9)) == {
        "Conv_0": (5, 5, 1, 4), "Conv_1": (5, 5, 4, 6), "Dense_0": (7 * 7 * 6, 9),
        "Dense_1": (9, 10)}


def test_cnn_accepts_every_layout_of_the_same_images():
    """Both sizes, every input layout: models built from a flat, [H, W] or [H, W, 1]
    input shape have the same parameters and map [B, s*s], [B, s, s] and [B, s, s, 1] to
    logits [B, classes] (shapes traced, nothing compiled; the same logits for two
    layouts: the evaluation test below)."""
    for side in (28, 8):
        specs = [(side * side,), (side, side), (side, side, 1)]
        layouts = [(3, side * side), (3, side, side), (3, side, side, 1)]
        params = {str(jax.eval_shape(cnn(s, 7).init, jax.random.key(0))) for s in specs}
        assert len(params) == 1
        for spec in specs:
            model = cnn(spec, 7)
            shapes = jax.eval_shape(model.init, jax.random.key(0))
            for layout in layouts:
                out = jax.eval_shape(model.apply, shapes, jax.ShapeDtypeStruct(layout,
                                                                               jnp.float32))
                assert out.shape == (3, 7), (spec, layout)


def test_model_arguments_are_checked():
    for shape in [(20,), (2, 3, 4, 5), (0, 8)]:
        with pytest.raises(ValueError, match=r"cnn: input shape"):
            cnn(shape, 10)
    with pytest.raises(ValueError, match=r"cnn: channels must be two integers"):
        cnn((8, 8), 10, channels=(4, 8, 16))
    with pytest.raises(ValueError, match=r"cnn: dense must be positive"):
        cnn((8, 8), 10, dense=0)
    for build in (lambda k: cnn((8, 8), k), lambda k: mlp((8, 8), (4,), k)):
        with pytest.raises(ValueError, match=r"num_classes must be an integer >= 2"):
            build(1)
    with pytest.raises(ValueError, match=r"mlp: hidden_sizes is empty"):
        mlp((8, 8), (), 10)
    with pytest.raises(ValueError, match=r"mlp: hidden_sizes must be positive"):
        mlp((8, 8), (4, -1), 10)


def test_init_is_random_from_the_key():
    """Not zero-initialized like the linear models: drawn from the run's init key."""
    init = jax.jit(tiny_cnn().init)
    a, b, again = tiny_cnn_params(0), init(jax.random.key(1)), init(jax.random.key(0))
    kernels = [k for k in jax.tree.leaves(a) if k.ndim > 1]
    assert len(kernels) == 4 and all(np.std(np.asarray(k)) > 0 for k in kernels)
    assert all(not np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a),
                                                         jax.tree.leaves(b)) if u.ndim > 1)
    assert all(np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a),
                                                     jax.tree.leaves(again)))


# -------------------------------------------------------- float64 NumPy references

def np_log_softmax_loss(z, y):
    zmax = z.max(axis=1, keepdims=True)
    lse = zmax[:, 0] + np.log(np.exp(z - zmax).sum(axis=1))
    return lse - z[np.arange(len(y)), y]


def as_flax(params):
    return {"params": jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params)}


def test_mlp_forward_matches_numpy_float64():
    """McMahan et al.'s 2NN on 8x8 inputs: relu(relu(x W0 + b0) W1 + b1) W2 + b2, its
    softmax cross-entropy and argmax."""
    model = mlp((8, 8), (200, 200), 10)
    rng = np.random.default_rng(1)
    params = jax.tree.map(np.float64, numpy_params(model, 3)["params"])
    x = rng.uniform(size=(5, 8, 8))
    y = rng.integers(0, 10, size=5)
    h = x.reshape(5, -1)
    for i in range(3):
        h = h @ params[f"Dense_{i}"]["kernel"] + params[f"Dense_{i}"]["bias"]
        if i < 2:
            h = np.maximum(h, 0.0)
    logits, loss, predicted = jax.jit(lambda p, x, y: (
        lambda z: (z, model.loss(z, y), model.predict(z)))(model.apply(p, x)))(
        as_flax(params), jnp.asarray(x, jnp.float32), jnp.asarray(y))
    np.testing.assert_allclose(logits, h, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(loss, np_log_softmax_loss(h, y), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(predicted, h.argmax(axis=1))


def np_conv_same(x, kernel, bias):
    """Stride-1 SAME cross-correlation: x [B, H, W, Ci], kernel [kh, kw, Ci, Co]."""
    kh, kw, _, co = kernel.shape
    B, H, W, _ = x.shape
    top, left = (kh - 1) // 2, (kw - 1) // 2
    xp = np.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
    out = np.zeros((B, H, W, co))
    for i in range(kh):
        for j in range(kw):
            out += np.einsum("bhwc,cd->bhwd", xp[:, i:i + H, j:j + W], kernel[i, j])
    return out + bias


def np_max_pool_same(x):
    """2x2 max pooling, stride 2, SAME: odd sides padded at the end with -inf."""
    B, H, W, C = x.shape
    Ho, Wo = -(-H // 2), -(-W // 2)
    padded = np.full((B, 2 * Ho, 2 * Wo, C), -np.inf)
    padded[:, :H, :W] = x
    return padded.reshape(B, Ho, 2, Wo, 2, C).max(axis=(2, 4))


def test_cnn_forward_matches_numpy_float64_and_flax_layers():
    """Odd, non-square, two-channel images, so padding, pooling and flattening order all
    show: 7x6x2 -> conv -> pool 4x3 -> conv -> pool 2x2 -> dense -> logits. The im2col
    convolution and reshape pooling also equal flax's own nn.Conv and nn.max_pool, in
    value and in gradient (with respect to the parameters and the input)."""
    import flax.linen as nn
    from fedjax_lite.models.cnn import Conv, max_pool_2x2
    model = cnn((7, 6, 2), 4, channels=(3, 5), dense=6)
    rng = np.random.default_rng(2)
    params = jax.tree.map(np.float64, numpy_params(model, 4)["params"])
    x = rng.normal(size=(3, 7, 6, 2))
    h = x
    for name in ("Conv_0", "Conv_1"):
        h = np_max_pool_same(np.maximum(np_conv_same(h, **params[name]), 0.0))
    assert h.shape == (3, 2, 2, 5)
    dense = params["Dense_0"]
    h = np.maximum(h.reshape(3, -1) @ dense["kernel"] + dense["bias"], 0.0)
    expected = h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]

    conv0 = as_flax(params["Conv_0"])
    ours = lambda p, x: max_pool_2x2(Conv(3).apply(p, x))
    theirs = lambda p, x: nn.max_pool(nn.Conv(3, (5, 5), padding="SAME").apply(p, x),
                                      (2, 2), strides=(2, 2), padding="SAME")
    value_and_grads = lambda f: jax.value_and_grad(
        lambda p, x: jnp.sum(jnp.sin(f(p, x))), argnums=(0, 1))      # params and input
    logits, a, b = jax.jit(lambda p, x: (model.apply(p, x), value_and_grads(ours)(conv0, x),
                                         value_and_grads(theirs)(conv0, x)))(
        as_flax(params), jnp.asarray(x, jnp.float32))
    np.testing.assert_allclose(logits, expected, rtol=1e-4, atol=1e-5)
    for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_allclose(u, v, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------- padding, local training

def test_masked_loss_ignores_padding_and_tiny_overfit_reaches_full_accuracy():
    """12 random 8x8 images with labels of 3 classes (one compiled program): the masked
    loss of the cnn and the mlp is the same with 8 garbage examples padded on (the local
    update under padding: the round-level test below), and full-batch Adam in the
    engine's local training makes the cnn memorize them."""
    models = {"cnn": tiny_cnn(), "mlp": mlp((8, 8), (16,), CLASSES)}
    params = {"cnn": tiny_cnn_params(), "mlp": numpy_params(models["mlp"], 1)}
    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.uniform(size=(12, 8, 8)), jnp.float32)
    y = jnp.asarray(np.arange(12) % CLASSES, jnp.int32)
    x_pad = jnp.concatenate([x, jnp.asarray(5 * rng.normal(size=(8, 8, 8)), jnp.float32)])
    y_pad = jnp.concatenate([y, jnp.asarray(rng.integers(0, CLASSES, 8), jnp.int32)])
    epochs = 150
    orders = jnp.tile(jnp.arange(12, dtype=jnp.int32), (epochs, 1))

    @jax.jit
    def run(params):
        losses = {kind: (jnp.mean(m.loss(m.apply(params[kind], x), y)),
                         masked_mean_loss(m, params[kind], x_pad, y_pad,
                                          jnp.arange(20) < 12))
                  for kind, m in models.items()}
        cnn_model = models["cnn"]
        fitted, _ = local_train(data_loss(cnn_model), optax.adam(0.03), params["cnn"], x, y,
                                jnp.asarray(12), orders, local_epochs=epochs,
                                batch_size=12, unroll=1)
        after = cnn_model.apply(fitted, x)
        return losses, jnp.mean(cnn_model.loss(after, y)), jnp.mean(
            cnn_model.predict(after) == y)

    losses, after, accuracy = run(params)
    for kind, (unpadded, padded) in losses.items():
        np.testing.assert_allclose(padded, unpadded, rtol=1e-6, err_msg=kind)
    assert float(accuracy) == 1.0 and float(after) < 0.1 < 0.5 < float(losses["cnn"][0])


# ------------------------------------------------- every algorithm and aggregator

P, N, C_ROUND = 6, 8, 4


def tiny_population(padded: bool = False) -> dict:
    """Six clients of 8x8 images in [0, 1] (the digits' layout), 2-8 examples each,
    padded to 8 with zeros -- or, ``padded``, to 16 with garbage examples."""
    rng = np.random.default_rng(0)
    x = rng.uniform(size=(P, N, 8, 8)).astype(np.float32)
    y = rng.integers(0, CLASSES, (P, N)).astype(np.int32)
    n = np.array([8, 2, 5, 7, 3, 6], np.int32)
    pad = np.arange(N)[None] >= n[:, None]
    x[pad] = 0.0
    if padded:
        x[pad] = 5.0 * rng.normal(size=(int(pad.sum()), 8, 8))
        x = np.concatenate([x, 5.0 * rng.normal(size=(P, N, 8, 8))], 1).astype(np.float32)
        y = np.concatenate([y, rng.integers(0, CLASSES, (P, N))], 1).astype(np.int32)
    return {"x": jnp.asarray(x), "y": jnp.asarray(y), "n": jnp.asarray(n)}


def tiny_config(algorithm: dict, **sections) -> cfg.Config:
    return cfg.parse({
        "data": {"kind": "synthetic_logistic", "num_clients": P},
        "model": {"kind": "cnn", "num_classes": CLASSES, **TINY},
        "algorithm": {"clients_per_round": C_ROUND, "batch_size": 3, "local_epochs": 1,
                      "client_optimizer": {"name": "sgd", "learning_rate": 0.2},
                      **algorithm},
        "engine": {"unroll": 1, **sections.pop("engine", {})}, **sections})


DP = {"name": "dp_gaussian", "clip_norm": 0.5, "noise_multiplier": 0.1}
# Each case compiles one round program (seconds on CPU), so the aggregators and engine
# paths are spread over the algorithms rather than crossed with them. fedadam runs the
# FedAvg code path (FedAvg with a server optimizer); the rest of the FedOpt family gets
# its server step checked below. FedProx trains with Adam: stateful, so a padded
# client's masked steps must be skipped (the padding test reruns it padded).
PADDED_CASE = "fedprox+adam+median"
BLOCKED_CASE = "fedsgd+dp_gaussian+compile_rounds"
CASES = {
    "fedadam+micro_cohort": ({"name": "fedadam"}, {"engine": {"micro_cohort": 2}}),
    PADDED_CASE: ({"name": "fedprox", "mu": 0.1,
                   "client_optimizer": {"name": "adam", "learning_rate": 0.05}},
                  {"aggregator": {"name": "median"}}),
    "scaffold+trimmed_mean+top_k_error_feedback": (
        {"name": "scaffold"}, {"aggregator": {"name": "trimmed_mean", "trim": 0.25},
                               "compression": {"kind": "top_k", "fraction": 0.3,
                                               "error_feedback": True}}),
    "fednova+krum+qsgd_error_feedback": (
        {"name": "fednova"}, {"aggregator": {"name": "krum", "num_byzantine": 1},
                              "compression": {"kind": "qsgd", "bits": 4,
                                              "error_feedback": True}}),
    BLOCKED_CASE: ({"name": "fedsgd", "weighting": "uniform"},
                   {"aggregator": DP, "engine": {"compile_rounds": 2}}),
}


@functools.cache
def run_case(case: str, padded: bool = False):
    """Two rounds of ``case`` from the tiny cnn's init: (config, state, train losses)."""
    algorithm, sections = CASES[case]
    config = tiny_config(algorithm, **dict(sections))
    model = build_model(config, (8, 8))
    assert str(jax.eval_shape(model.init, jax.random.key(0))) == str(
        jax.eval_shape(tiny_cnn_params))            # the same architecture as tiny_cnn
    algo = build_algorithm(config, model, engine_options(config.engine), num_clients=P)
    round_fn = build_round(algo, num_clients=P, clients_per_round=C_ROUND)
    state = algo.init(tiny_cnn_params())
    population, root = tiny_population(padded), jax.random.key(1)
    if config.engine.compile_rounds > 1:
        state, metrics = jax.jit(build_rounds(round_fn, 2))(state, population, root, 0)
        return config, state, np.asarray(metrics["train_loss"])
    step = jax.jit(round_fn)
    losses = []
    for r in range(2):
        state, metrics = step(state, population, round_key(root, r))
        losses.append(float(metrics["train_loss"]))
    return config, state, np.asarray(losses)


@pytest.mark.parametrize("case", list(CASES))
def test_every_algorithm_and_aggregator_trains_the_cnn(case):
    """Two rounds from a random init: finite losses and parameters, parameters moved."""
    config, state, losses = run_case(case)
    assert int(state.round) == 2
    assert np.all(np.isfinite(losses)) and np.all(losses > 0), losses
    leaves = [np.asarray(a) for a in jax.tree.leaves(state.params)]
    assert all(np.all(np.isfinite(a)) for a in leaves)
    change = max(float(np.max(np.abs(a - np.asarray(b))))
                 for a, b in zip(leaves, jax.tree.leaves(tiny_cnn_params())))
    assert change > 1e-4, case
    if config.compression.error_feedback:       # the residuals kept what was not sent
        assert max(float(np.max(np.abs(np.asarray(r))))
                   for r in jax.tree.leaves(state.residuals)) > 0


def test_padding_changes_no_round_of_local_training():
    """The FedProx case (Adam clients) rerun on the population padded to 16 examples a
    client with garbage: every client's local update -- hence the model (their
    coordinate-wise median) and the server optimizer's state -- and the train losses are
    the same as at 8."""
    _, state, losses = run_case(PADDED_CASE)
    _, padded, padded_losses = run_case(PADDED_CASE, padded=True)
    np.testing.assert_allclose(padded_losses, losses, rtol=1e-6)
    for a, b in zip(jax.tree.leaves(padded), jax.tree.leaves(state)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_fedopt_server_optimizers_step_the_flax_parameters():
    """The FedOpt family besides fedadam (run whole above): fedavg, fedavgm, fedyogi and
    fedadagrad are FedAvg with these optax server optimizers on the pseudo-gradient,
    so their only model-facing part is the server step on the nested flax parameters:
    two steps each from a random init move every leaf against the pseudo-gradient."""
    from fedjax_lite.algorithms.fedavg import server_update
    from fedjax_lite.experiment.builders import build_optimizer
    init = tiny_cnn_params()
    rng = np.random.default_rng(5)
    delta = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape), a.dtype), init)
    names = ("fedavg", "fedavgm", "fedyogi", "fedadagrad")
    txs = [build_optimizer(tiny_config({"name": name}).algorithm.server_optimizer)
           for name in names]

    @jax.jit
    def two_steps(params):
        out = []
        for tx in txs:
            p, opt_state = params, tx.init(params)
            for _ in range(2):
                p, opt_state = server_update(tx, p, opt_state, delta, jnp.ones(C_ROUND))
            out.append(p)
        return out

    for name, params in zip(names, two_steps(init)):
        same_sign = jax.tree.map(lambda new, old, d: bool(jnp.all(jnp.sign(new - old)
                                                                  == jnp.sign(d))),
                                 params, init, delta)
        assert all(jax.tree.leaves(same_sign)), name


# ------------------------------------------------------------------------ config

def test_config_kinds_parse_and_round_trip_through_yaml():
    c = cfg.parse({"model": {"kind": "mlp"}})
    assert c.model.hidden == (200, 200) and c.model.num_classes == 10      # the 2NN
    c = cfg.parse({"model": {"kind": "mlp", "hidden": [64, "32", 16.0], "num_classes": 4}})
    assert c.model.hidden == (64, 32, 16)
    written = cfg.to_dict(c)
    assert written["model"] == {"kind": "mlp", "hidden": [64, 32, 16], "num_classes": 4}
    assert cfg.parse(yaml.safe_load(yaml.safe_dump(written))) == c
    for model in ({"kind": "cnn"}, {"kind": "cnn", "channels": [8, 16], "dense": 32}):
        c = cfg.parse({"model": {**model, "num_classes": 62}})
        written = cfg.to_dict(c)
        assert written["model"]["channels"] == model.get("channels")
        assert cfg.parse(yaml.safe_load(yaml.safe_dump(written))) == c
    c = cfg.parse({"model": {"kind": "cnn", "channels": [8, 16], "dense": 32}})
    assert (c.model.channels, c.model.dense) == ((8, 16), 32)
    assert layer_shapes(build_model(c, (784,)))["Dense_0"] == (7 * 7 * 16, 32)
    c = cfg.parse({"model": {"kind": "mlp", "hidden": [5]}})
    assert layer_shapes(build_model(c, (8, 8)))["Dense_0"] == (64, 5)


@pytest.mark.parametrize("model, match", [
    ({"kind": "mlp", "hidden": []}, r"'model.hidden': got \[\], expected a non-empty list"),
    ({"kind": "mlp", "hidden": [200, 0]}, r"'model.hidden': got \[200, 0\], expected a "
                                          r"non-empty list of positive integers"),
    ({"kind": "mlp", "hidden": 200}, r"'model.hidden': got 200, expected a list of "
                                     r"integers"),
    ({"kind": "mlp", "hidden": [True]}, r"'model.hidden': got \[True\], expected a list"),
    ({"kind": "mlp", "hidden": ["wide"]}, r"'model.hidden': got \['wide'\]"),
    ({"kind": "mlp", "num_classes": 1}, r"'model.num_classes': got 1, expected an integer "
                                        r">= 2"),
    ({"kind": "cnn", "num_classes": 0}, r"'model.num_classes': got 0"),
    ({"kind": "cnn", "channels": [32]}, r"'model.channels': got \[32\], expected null or a "
                                        r"list of two positive integers"),
    ({"kind": "cnn", "channels": [32, 64, 128]}, r"'model.channels'"),
    ({"kind": "cnn", "channels": "wide"}, r"'model.channels': got 'wide', expected a list "
                                          r"of integers or null"),
    ({"kind": "cnn", "dense": 0}, r"'model.dense': got 0, expected null or a positive"),
    ({"kind": "cnn", "hidden": [4]}, r"unknown config key 'model.hidden'; allowed keys "
                                     r"under 'model': channels, dense, kind, num_classes"),
    ({"kind": "mlp", "channels": [4, 4]}, r"unknown config key 'model.channels'"),
])
def test_config_refusals_name_the_key(model, match):
    with pytest.raises(cfg.ConfigError, match=match):
        cfg.parse({"model": model})


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_num_classes_must_match_the_data(kind):
    data = {"kind": "fedprox_synthetic", "num_classes": 10}
    with pytest.raises(cfg.ConfigError, match=r"'model.num_classes': 3 differs from "
                                              r"data.num_classes=10"):
        cfg.parse({"data": data, "model": {"kind": kind, "num_classes": 3}})
    assert cfg.parse({"data": data, "model": {"kind": kind}}).num_classes == 10


def test_cli_lists_the_kinds_and_refuses_a_cnn_on_non_images(tmp_path, capsys):
    from fedjax_lite.experiment.cli import main
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "mlp, cnn" in " ".join(capsys.readouterr().out.split())
    raw = {"rounds": 1, "data": {"kind": "synthetic_logistic", "num_clients": 8,
                                 "num_features": 20, "mean_examples": 6},
           "model": {"kind": "cnn"}, "algorithm": {"clients_per_round": 2}}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "out"
    assert main(["run", str(path), "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "config key 'model.kind': cnn: input shape (20,)" in err, err
    assert not out.exists()
