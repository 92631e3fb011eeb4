"""Secure aggregation with dropouts (fedjax_lite.privacy.secagg, .fixed_point) against
independent float64 / int64 NumPy references: exact mask cancellation for SecAgg and
SecAgg+ under dropouts, uniform uploads, the abort threshold, unbiased fixed-point
rounding at 20-24 bits, communication cost scaling, and DP-FedAvg on the secure sum."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedjax_lite.privacy import fixed_point, secagg
from fedjax_lite.privacy.clipping import clip_rows

# ----------------------------------------------------------------------------------------
# Fixed point
# ----------------------------------------------------------------------------------------


def np_scaled(x, c, bits):
    """float64 reference of t = (clip(x) + c) / (2c) (2^bits - 1), NaN -> midpoint."""
    c = float(np.float32(c))
    x = np.asarray(x, np.float64)
    x = np.where(np.isnan(x), 0.0, np.clip(x, -c, c))
    return (x + c) / (2 * c) * (2 ** bits - 1)


def test_modulus_bits_and_check_bits():
    assert [fixed_point.modulus_bits(16, n) for n in (1, 2, 3, 4, 5, 256, 257)] == [
        17, 17, 18, 18, 19, 24, 25]
    fixed_point.check_bits(24, 256)                         # r = 32 fits
    with pytest.raises(ValueError) as err:
        fixed_point.check_bits(24, 257)
    msg = str(err.value)
    assert "aggregator.bits=24" in msg and "257" in msg and "<= 23" in msg and "\n" not in msg
    for bad in (1, 25, 16.0, True):
        with pytest.raises(ValueError, match="aggregator.bits must be an integer"):
            fixed_point.check_bits(bad, 4)
    # the aggregators check at trace time, when the cohort size is known
    agg = secagg.secure_mean(1.0, 24, min_survivors=1)
    deltas = jnp.zeros((300, 2))
    with pytest.raises(ValueError, match="aggregator.bits=24"):
        agg.apply(deltas, jnp.ones(300), (), jax.random.key(0))


@pytest.mark.parametrize("bits", [2, 8, 16, 20, 24])
def test_scaled_parts_match_float64(bits):
    """floor(t) + frac(t) equals the float64 value to ~2^-23 for any input, any c."""
    rng = np.random.default_rng(bits)
    for c in (1.0, 0.3, 1e-5, 7e3):
        x = (rng.uniform(-1.3, 1.3, 20000) * c).astype(np.float32)
        x[:8] = [c, -c, 0.0, np.nan, np.inf, -np.inf, 1e38, -3e-39]
        low, frac = fixed_point.scaled_parts(jnp.asarray(x), c, bits)
        low, frac = np.asarray(low, np.float64), np.asarray(frac, np.float64)
        assert np.all((frac >= 0) & (frac < 1))
        err = np.abs(low + frac - np_scaled(x, c, bits))
        assert err.max() <= 2.0 ** -22, (c, err.max())


def old_float32_encode(x, key, c, bits):
    """The earlier encoding (reimplemented): t and its fraction in float32."""
    levels = float(2 ** bits - 1)
    scaled = (jnp.clip(x, -c, c) + c) / (2 * c) * levels
    low = jnp.floor(scaled)
    up = jax.random.uniform(key, scaled.shape, scaled.dtype) < (scaled - low)
    return low + up.astype(scaled.dtype)


@pytest.mark.parametrize("bits", [20, 24])
def test_encode_is_unbiased_where_float32_rounding_was_not(bits):
    """E[enc(x)] = t in float64 within 5 standard errors over 10^6 draws, for values the
    float32 formula encodes with a bias of many standard errors."""
    c, n = 1.0, 1_000_000
    cands = (np.float32(0.61) + np.arange(4000, dtype=np.float32) * np.float32(3e-7))
    cands = cands.astype(np.float32)
    t = np_scaled(cands, c, bits)
    old_t = np.asarray((jnp.asarray(cands) + c) / (2 * c) * float(2 ** bits - 1), np.float64)
    worst = np.argsort(-np.abs((old_t - np.floor(old_t)) - (t - np.floor(t))))[:3]
    x, exact = cands[worst], t[worst]
    xs = jnp.broadcast_to(jnp.asarray(x), (n, 3))
    se = np.sqrt(np.maximum(exact % 1 * (1 - exact % 1), 1e-3) / n)
    new = np.asarray(jax.jit(fixed_point.encode, static_argnums=(2, 3))(
        xs, jax.random.key(1), c, bits), np.float64).mean(0)
    old = np.asarray(jax.jit(old_float32_encode, static_argnums=(2, 3))(
        xs, jax.random.key(1), c, bits), np.float64).mean(0)
    assert np.all(np.abs(new - exact) < 5 * se), (new - exact, se)
    assert np.all(np.abs(old - exact) > 20 * se), (old - exact, se)


def test_encode_clips_every_input():
    c, bits, n = 0.5, 12, 4000
    levels = 2 ** bits - 1
    x = jnp.asarray([np.nan, np.inf, -np.inf, 1e30, -1e30, c, -c, 0.0], jnp.float32)
    enc = np.asarray(fixed_point.encode(jnp.broadcast_to(x, (n, 8)), jax.random.key(2), c,
                                        bits))
    assert enc.dtype == np.uint32
    for col in (1, 3, 5):
        assert np.all(enc[:, col] == levels)
    for col in (2, 4, 6):
        assert np.all(enc[:, col] == 0)
    for col in (0, 7):            # NaN encodes like 0.0: the midpoint L/2, unbiased
        assert set(np.unique(enc[:, col])) == {levels // 2, levels // 2 + 1}
        assert abs(enc[:, col].mean() - levels / 2) < 5 * 0.5 / math.sqrt(n)


def test_decode_mean_is_exact_at_the_largest_modulus():
    """bits = 24 with 200 clients (r = 32): integer quotient and remainder, so the 32-bit
    total is never rounded to float32; the result is the float64 mean to float32
    precision (relative), near the midpoint 0 as well as near +-c."""
    rng = np.random.default_rng(3)
    bits, m, c = 24, 200, 3.0
    q = rng.integers(2 ** 24 - 40, 2 ** 24, (m, 96)).astype(np.int64)
    q[:, :32] = rng.integers(0, 2 ** 24, (m, 32))
    q[:, 32:64] = 2 ** 23 + rng.integers(-2, 2, (m, 32))       # means near 0
    total = q.sum(0)
    assert total.max() > 2 ** 31
    out = np.asarray(fixed_point.decode_mean(jnp.asarray(total, jnp.uint32), jnp.int32(m), c,
                                             bits), np.float64)
    ref = total / m * 2 * c / (2 ** bits - 1) - c
    np.testing.assert_allclose(out, ref, rtol=2.0 ** -22, atol=1e-12)


# ----------------------------------------------------------------------------------------
# The protocol
# ----------------------------------------------------------------------------------------


def np_graph(key, C, k):
    nbrs = np.asarray(secagg.neighbor_slots(key, C, k))
    return [set(row.tolist()) for row in nbrs]


@pytest.mark.parametrize("C,k", [(9, None), (10, None), (10, 2), (10, 4), (11, 6)])
def test_graph_is_regular_and_symmetric(C, k):
    graph = np_graph(jax.random.key(5), C, k)
    deg = C - 1 if k is None else k
    for i, nb in enumerate(graph):
        assert len(nb) == deg and i not in nb
        assert all(i in graph[j] for j in nb)
    if k is not None:    # a random cycle: another round key gives another graph
        assert graph != np_graph(jax.random.key(6), C, k)


@functools.lru_cache(maxsize=None)
def _sum(C, k, min_survivors=1, r=20):
    return jax.jit(lambda e, rep, key: secagg.secure_sum(
        e, rep, key, modulus_bits=r, min_survivors=min_survivors, neighbors=k))


@pytest.mark.parametrize("C,k", [(9, None), (10, 2), (10, 4), (11, 6)])
def test_masks_cancel_exactly_under_dropouts(C, k):
    """The server's result is bit for bit the int64 sum of the survivors' encodings mod
    2^r, for several dropout patterns, including a survivor whose neighbours all dropped
    (all pairs: the lone survivor; SecAgg+: the round must abort, as the survivor's
    self-mask cannot be rebuilt); the uploads alone do not sum to it."""
    r, key = 20, jax.random.key(7)
    rng = np.random.default_rng(C)
    enc = rng.integers(0, 2 ** (r - 4), (C, 33)).astype(np.uint32)
    graph = np_graph(key, C, k)
    isolated = np.ones(C, bool)
    isolated[list(graph[2])] = False               # slot 2 survives, its neighbours not
    patterns = [np.ones(C, bool), rng.random(C) < 0.6, isolated,
                np.arange(C) != 0, np.arange(C) == C - 1]
    run = _sum(C, k)
    for rep in patterns:
        out = run(jnp.asarray(enc), jnp.asarray(rep), key)
        want = enc[rep].astype(np.int64).sum(0) % 2 ** r
        # SecAgg+: the server must rebuild the secrets of every survivor and of every
        # dropped client with a surviving neighbour from a majority of its neighbours
        alive = np.array([sum(rep[j] for j in graph[i]) for i in range(C)])
        starved = (rep | (alive > 0)) & (alive < (k or 0) // 2 + 1)
        if k is not None and starved.any():
            assert bool(out.aborted) and np.all(np.asarray(out.total) == 0)
            continue
        np.testing.assert_array_equal(np.asarray(out.total), want)
        assert not bool(out.aborted)
        uploads = np.asarray(out.uploads)
        assert np.all(uploads[~rep] == 0) and np.all(uploads < 2 ** r)
        raw = uploads.astype(np.int64).sum(0) % 2 ** r
        assert np.mean(raw == want) < 0.1         # the masks were there to remove


@pytest.mark.parametrize("C,k,rep", [(4, None, [1, 1, 1, 1]), (5, 2, [1, 0, 1, 1, 1])])
def test_each_upload_is_uniform(C, k, rep):
    """What the server receives from one client is uniform mod 2^r whatever its input
    (chi-square of the top and the bottom 3 bits, df 7, p ~ 1e-5)."""
    D, bits = 4096, 8
    r = fixed_point.modulus_bits(bits, C)
    rep = np.asarray(rep, bool)
    run = _sum(C, k, r=r)
    for val in (0, 2 ** bits - 1, 77):
        enc = jnp.full((C, D), val, jnp.uint32)
        uploads = np.asarray(run(enc, jnp.asarray(rep), jax.random.key(val)).uploads)
        for i in np.flatnonzero(rep):
            for digits in (uploads[i] >> (r - 3), uploads[i] & 7):
                counts = np.bincount(digits, minlength=8)
                chi2 = np.sum((counts - D / 8) ** 2 / (D / 8))
                assert chi2 < 35.0, (val, i, counts)


def _cohort(C, D, seed=0):
    rng = np.random.default_rng(seed)
    return {"a": jnp.asarray(rng.normal(0, 0.6, (C, D - 3)), jnp.float32),
            "b": jnp.asarray(rng.normal(0, 0.6, (C, 3)), jnp.float32)}


def _rows(deltas):
    return np.concatenate([np.asarray(deltas["a"], np.float64),
                           np.asarray(deltas["b"], np.float64)], axis=1)


def _update(delta):
    return np.concatenate([np.asarray(delta["a"], np.float64),
                           np.asarray(delta["b"], np.float64)])


def test_lone_survivor_aborts_with_the_default_threshold():
    """The server must not get a lone client's encoding: with the default (majority)
    threshold, one survivor aborts the round (zero delta, nothing decoded); the
    threshold is inclusive."""
    C, D = 9, 8
    t = secagg.default_min_survivors(C)
    assert t == 5
    deltas = _cohort(C, D)
    lone = np.arange(C) == 2
    apply = jax.jit(secagg.secure_mean(1.0, 12, min_survivors=t).apply)
    for w in (jnp.asarray(lone * 3.0), jnp.asarray(lone * 3.0).at[4].set(jnp.nan)):
        delta, _, metrics = apply(deltas, jnp.nan_to_num(w), (), jax.random.key(0))
        assert float(metrics["secagg_aborted"]) == 1.0
        assert float(metrics["num_reporting"]) == 1.0
        assert all(np.all(np.asarray(v) == 0) for v in jax.tree.leaves(delta))
    for m, aborted in ((t - 1, 1.0), (t, 0.0)):
        w = jnp.asarray(np.arange(C) < m, jnp.float32)
        delta, _, metrics = apply(deltas, w, (), jax.random.key(1))
        assert float(metrics["secagg_aborted"]) == aborted
        assert np.any(np.asarray(delta["a"]) != 0) == (not aborted)
    # what the abort prevents: with threshold 1 the server gets that client's encoding
    out = _sum(C, None)(jnp.full((C, 33), 9, jnp.uint32), jnp.asarray(lone),
                        jax.random.key(0))
    assert not bool(out.aborted) and np.all(np.asarray(out.total) == 9)


@pytest.mark.parametrize("k", [None, 6])    # k = 6: two dropouts leave every
def test_secure_mean_matches_float64_clipped_mean(k):   # neighbourhood its majority of 4
    C, D, bits, c = 9, 20, 16, 0.8
    deltas = _cohort(C, D, seed=4)
    deltas["a"] = deltas["a"].at[3, 0].set(jnp.nan).at[3, 1].set(jnp.inf)
    deltas["a"] = deltas["a"].at[5].set(jnp.nan)               # dropped: never read
    w = jnp.asarray([2.0, 1, 1, 5, 1, 0, 1, 0, 3])
    rep = np.asarray(w) > 0
    delta, _, metrics = jax.jit(secagg.secure_mean(c, bits, min_survivors=5,
                                                   neighbors=k).apply)(
        deltas, w, (), jax.random.key(2))
    x = _rows(deltas)[rep]
    clipped = np.where(np.isnan(x), 0.0, np.clip(x, -c, c))
    step = 2 * c / (2 ** bits - 1)
    out = _update(delta)
    assert np.all(np.abs(out - clipped.mean(0)) <= step + 1e-6)
    r = fixed_point.modulus_bits(bits, C)
    assert float(metrics["num_reporting"]) == rep.sum()
    assert float(metrics["secagg_aborted"]) == 0.0
    assert float(metrics["secagg_bytes_per_client"]) == r * D / 8
    assert float(metrics["secagg_protocol_bytes_per_client"]) == pytest.approx(
        float(secagg.protocol_bytes_per_client(C, rep.sum(), D, bits, k)))
    assert float(metrics["secagg_clipped_fraction"]) == pytest.approx(
        np.mean(~(np.abs(x) <= c)))
    assert {k: np.asarray(v).dtype for k, v in metrics.items()} == {
        name: np.float32 for name in metrics}


def test_all_pairs_never_builds_a_client_by_client_by_dim_tensor():
    """Every intermediate of the all-pairs protocol (scan bodies included) is O(C D)."""
    C, D = 16, 24
    jaxpr = jax.make_jaxpr(lambda e, rep, key: secagg.secure_sum(
        e, rep, key, modulus_bits=20, min_survivors=1))(
        jnp.zeros((C, D), jnp.uint32), jnp.ones(C, bool), jax.random.key(0))

    def sizes(j):
        for eqn in j.eqns:
            yield from (math.prod(v.aval.shape) for v in eqn.outvars)
            for p in eqn.params.values():
                for q in (p if isinstance(p, (tuple, list)) else (p,)):
                    inner = getattr(q, "jaxpr", q)
                    if hasattr(inner, "eqns"):
                        yield from sizes(inner)

    assert max(sizes(jaxpr.jaxpr)) <= 2 * C * D


def test_protocol_bytes_grow_with_C_for_all_pairs_only():
    """Per client: keys + (degree) x (share message + unmasking share) + the masked input;
    degree C - 1 for all pairs, k for SecAgg+."""
    D, bits = 8, 10
    unit = secagg.SHARE_MESSAGE_BYTES + secagg.SHARE_BYTES      # per neighbour
    for C in (6, 12, 24, 1000):
        masked = fixed_point.modulus_bits(bits, C) * D / 8
        assert float(secagg.protocol_bytes_per_client(C, C, D, bits, None)) - masked == (
            pytest.approx(2 * secagg.PUBLIC_KEY_BYTES + (C - 1) * unit))
        assert float(secagg.protocol_bytes_per_client(C, C, D, bits, 4)) - masked == (
            pytest.approx(2 * secagg.PUBLIC_KEY_BYTES + 4 * unit))
    # dropped slots send keys and shares but neither a masked input nor unmasking shares
    full = float(secagg.protocol_bytes_per_client(10, 10, D, bits, 4))
    half = float(secagg.protocol_bytes_per_client(10, 5, D, bits, 4))
    r = fixed_point.modulus_bits(bits, 10)
    assert full - half == pytest.approx(0.5 * (r * D / 8 + 4 * secagg.SHARE_BYTES))
    # from 100 to 1000 clients at D = 1000: all pairs ~9x; SecAgg+ only the 3 more
    # modulus bits of the masked input (ceil(log2 C) from 7 to 10)
    big = [float(secagg.protocol_bytes_per_client(C, C, 1000, 8, k))
           for k in (None, 8) for C in (100, 1000)]
    assert big[1] / big[0] > 8
    assert big[3] - big[2] == pytest.approx(3 * 1000 / 8)
    # an aborted round has no Unmasking round
    assert float(secagg.protocol_bytes_per_client(10, 10, D, bits, 4, True)) == (
        pytest.approx(full - 4 * secagg.SHARE_BYTES))


def test_rejects_bad_arguments():
    with pytest.raises(ValueError, match="clip_value"):
        secagg.secure_mean(0.0, min_survivors=2)
    with pytest.raises(ValueError, match="noise_multiplier"):
        secagg.dp_secure_mean(1.0, -1.0, 5.0, 12, min_survivors=2)
    with pytest.raises(ValueError, match="expected_clients"):
        secagg.dp_secure_mean(1.0, 1.0, 0.0, 12, min_survivors=2)
    for k in (3, 0, 6):
        with pytest.raises(ValueError, match="aggregator.neighbors"):
            secagg.check_graph(k, 6)
    for t in (0, 7, 2.5):
        with pytest.raises(ValueError, match="aggregator.min_survivors"):
            secagg.check_min_survivors(t, 6)
    with pytest.raises(ValueError, match="aggregator.min_survivors must be an integer >= 1,"):
        secagg.secure_mean(1.0, min_survivors=0)
    with pytest.raises(ValueError, match="aggregator.neighbors"):
        secagg.dp_secure_mean(1.0, 1.0, 5.0, 12, min_survivors=2, neighbors=5)
    # what needs the cohort size fails at trace time, before anything compiles
    for kwargs in ({"min_survivors": 7}, {"min_survivors": 2, "neighbors": 6}):
        apply = secagg.secure_mean(1.0, **kwargs).apply
        with pytest.raises(ValueError, match="<= cohort size 6|< cohort size 6"):
            apply(_cohort(6, 4), jnp.ones(6), (), jax.random.key(0))


# ----------------------------------------------------------------------------------------
# DP-FedAvg on the secure sum
# ----------------------------------------------------------------------------------------


def np_clip_rows(x, S):
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x * np.minimum(1.0, S / np.maximum(norms, 1e-300))


def test_dp_secure_mean_without_noise_is_the_clipped_sum_over_the_denominator():
    C, D, S, bits, denom = 7, 12, 1.5, 16, 6.5
    deltas = _cohort(C, D, seed=5)
    deltas["a"] = deltas["a"].at[1].multiply(10.0)             # clipped
    w = jnp.asarray([1.0, 1, 1, 0, 1, 1, 1])
    rep = np.asarray(w) > 0
    delta, _, m = jax.jit(secagg.dp_secure_mean(S, 0.0, denom, bits, min_survivors=4).apply)(
        deltas, w, (), jax.random.key(3))
    out = _update(delta)
    want = np_clip_rows(_rows(deltas)[rep], S).sum(0) / denom
    step = 2 * S / (2 ** bits - 1)
    assert np.all(np.abs(out - want) <= rep.sum() * step / denom + 1e-6)
    assert float(m["clip_norm"]) == S and float(m["noise_std"]) == 0.0
    norms = np.linalg.norm(_rows(deltas)[rep], axis=1)
    assert 0 < np.mean(norms > S) < 1
    assert float(m["secagg_clipped_fraction"]) == pytest.approx(np.mean(norms > S))


def test_dp_secure_mean_noise_has_the_accounted_std():
    C, D, S, bits, denom, z = 4, 8192, 0.7, 8, 3.0, 2.0
    deltas = {"w": jnp.zeros((C, D))}
    w = jnp.ones(C)
    noisy = jax.jit(secagg.dp_secure_mean(S, z, denom, bits, min_survivors=3).apply)
    a, _, m = noisy(deltas, w, (), jax.random.key(4))
    # the decoded zeros are off by at most 4 grid steps / 3 = 0.007, the noise std is 0.8
    noise = np.asarray(a["w"], np.float64)
    s_eff = S + math.sqrt(D) * 2 * S / (2 ** bits - 1)
    assert float(m["noise_std"]) == pytest.approx(z * s_eff / denom, rel=1e-6)
    assert noise.std() == pytest.approx(z * s_eff / denom, rel=0.04)
    assert abs(noise.mean()) < 4 * z * s_eff / denom / math.sqrt(D)
    # an aborted round releases nothing, noise included
    a, _, m = noisy(deltas, jnp.asarray([1.0, 1, 0, 0]), (), jax.random.key(4))
    assert float(m["secagg_aborted"]) == 1.0 and np.all(np.asarray(a["w"]) == 0)


@functools.lru_cache(maxsize=None)
def _clip_and_encode(S, bits):
    return jax.jit(lambda x, key: fixed_point.encode(
        clip_rows(x, jnp.ones(x.shape[0], bool), S).rows, key, S, bits))


@settings(max_examples=25, deadline=None)
@given(dim=st.sampled_from([3, 40]), bits_and_S=st.sampled_from([(2, 0.1), (12, 4.0)]),
       log_scale=st.floats(-3, 30), seed=st.integers(0, 2 ** 16))
def test_rounded_clipped_vectors_stay_within_the_sensitivity_bound(dim, bits_and_S,
                                                                   log_scale, seed):
    bits, S = bits_and_S
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(64, dim)) * 10.0 ** log_scale
    x[1] = 10.0 ** log_scale                      # all coordinates equal: worst rounding
    x[2, 0] = np.nan                              # sent as the zero vector
    enc = _clip_and_encode(S, bits)(jnp.asarray(x, jnp.float32), jax.random.key(seed))
    S32 = float(np.float32(S))
    dec = np.asarray(enc, np.float64) * 2 * S32 / (2 ** bits - 1) - S32
    bound = secagg.sensitivity_bound(S32, bits, dim)
    assert np.all(np.linalg.norm(dec, axis=1) <= bound * (1 + 1e-6))


def test_rounding_can_exceed_the_clip_norm():
    """Why S_eff and not S: rounded vectors do leave the S-ball."""
    S, bits, dim = 0.1, 2, 40
    enc = _clip_and_encode(S, bits)(jnp.ones((64, dim)), jax.random.key(0))
    S32 = float(np.float32(S))
    dec = np.asarray(enc, np.float64) * 2 * S32 / (2 ** bits - 1) - S32
    assert np.linalg.norm(dec, axis=1).max() > S32 * 1.2
