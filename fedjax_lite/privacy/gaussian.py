"""DP-FedAvg's Gaussian mechanism, with optional adaptive clipping.

Papers:
  * McMahan, Ramage, Talwar, Zhang, "Learning Differentially Private Recurrent Language
    Models", ICLR 2018 (DP-FedAvg, Algorithm 1: clip, sum, Gaussian noise, fixed
    denominator);
  * Andrew, Thakkar, McMahan, Ramaswamy, "Differentially Private Learning with Adaptive
    Clipping", NeurIPS 2021 (Algorithm 1 with the geometric update, Theorem 1).

What one round releases. Every reporting client k (weight > 0) sends its whole update
Delta_k (all pytree leaves, flattened), clipped to L2 norm S with
:func:`fedjax_lite.privacy.clipping.clip_rows` (a row holding NaN/inf is sent as the zero
vector; a huge finite row is clipped, never dropped). The server releases

    Delta = (sum_k clip(Delta_k, S) + N(0, (z_Delta S)^2 I)) / m,

with m = ``expected_clients``, a FIXED public denominator. Weights only say who reported:
example-count weights would make one client's contribution unbounded.

Neighbouring relation, sensitivity, sampling:
  * Poisson sampling (each client joins the round independently with probability q) with
    add/remove-one-client neighbours: the sum changes by at most S in L2, so a round is
    the sampled Gaussian mechanism with noise multiplier z_Delta (and sampling rate q);
    account for it with dp-accounting's ``PoissonSampledDpEvent(q, GaussianDpEvent(z))``.
  * Fixed-size cohorts (C of K clients without replacement) with replace-one-client
    neighbours: the sum changes by up to 2S, i.e. the effective noise multiplier is z/2
    (``SampledWithoutReplacementDpEvent``). Accounting a fixed-size cohort as Poisson
    sampling with q = C/K and sensitivity S is NOT valid (adding a client pushes another
    out of the cohort: the sum moves by 2S); ``fedjax_lite.privacy.accounting`` refuses it.
    With adaptive clipping both the sum's and the count's sensitivity double under
    replace-one, so the same z/2 covers the pair.
  * The denominator must not depend on who reported (it would leak membership). Pass the
    expected number of reporting clients: qK, or qK(1 - p) when each sampled client drops
    out independently with probability p, which makes the average an unbiased estimate of
    the mean of the reporting clients' clipped updates (over the sampling).

Adaptive clipping (Andrew et al., Algorithm 1). S = S_t lives in ``agg_state`` (initial
value ``clip_norm``). In round t each reporting client also contributes the bit
b_k = 1[||Delta_k|| <= S_t]; the server computes the noisy fraction of unclipped updates

    b~ = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / m + 1/2

and moves the clip norm geometrically towards the ``target_quantile`` gamma:

    S_{t+1} = S_t * exp(-eta_C (b~ - gamma)).

The centred bits b_k - 1/2 in {-1/2, +1/2} give the count sensitivity 1/2 under add/remove
(the paper's choice; the +1/2 uses only the public m). When exactly m clients report this
equals (sum_k b_k + N(0, sigma_b^2)) / m; otherwise they differ by the zero-mean
(m - #reporting) / (2m). A client whose update is non-finite sends the zero vector and is
counted as unclipped (b_k = 1, the bit of what it sent).

Privacy budget split (Andrew et al., Theorem 1). Releasing the noisy sum (sensitivity S,
noise std z_Delta S) and the noisy count (sensitivity 1/2, noise std sigma_b) together is
the Gaussian mechanism on the concatenated, rescaled vector with squared sensitivity
1/z_Delta^2 + 1/(2 sigma_b)^2 in noise units, so it has overall noise multiplier z iff

    z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2),

which is real and finite iff sigma_b > z / 2 (strictly). Account for the adaptive
mechanism as the plain one with noise multiplier z = ``noise_multiplier``. The clip norm
is a post-processing of released counts, so it costs nothing more.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jax.flatten_util import ravel_pytree

from fedjax_lite.core.aggregators import Aggregator, Reduction, reduced
from fedjax_lite.privacy.clipping import clipped_sums, clipped_sums_metrics

# Stream constants folded into the round's aggregation key. DP_NOISE_STREAM is the one the
# earlier dp_gaussian used for its update noise: keep it, so that noise stays as before.
DP_NOISE_STREAM = 0x44504E53   # "DPNS"
DP_COUNT_STREAM = 0x44504342   # "DPCB": noise on the count of unclipped updates


class AdaptiveClipping(NamedTuple):
    """Hyperparameters of adaptive clipping (Andrew et al. 2021, Algorithm 1).

    target_quantile: gamma, the fraction of updates that should be left unclipped.
    learning_rate: eta_C of the geometric update S <- S exp(-eta_C (b~ - gamma)).
    count_stddev: sigma_b, the std of the noise on the count of unclipped updates;
        None means expected_clients / 20 (the paper's recommendation).
    """
    target_quantile: float = 0.5
    learning_rate: float = 0.2
    count_stddev: float | None = None


class AdaptiveClipState(NamedTuple):
    clip_norm: jax.Array   # float32[]: S_t, the clip norm the next round uses


def adaptive_noise_split(noise_multiplier: float, count_stddev: float) -> float:
    """z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2) (Andrew et al. 2021, Theorem 1): the noise
    multiplier on the update sum such that (noisy sum, noisy count with std sigma_b and
    sensitivity 1/2) has overall noise multiplier z. Requires sigma_b > z / 2 when
    z > 0; z = 0 (no privacy) gives 0 for any sigma_b >= 0."""
    z, sigma_b = float(noise_multiplier), float(count_stddev)
    if not (math.isfinite(z) and z >= 0):
        raise ValueError(f"adaptive_noise_split: noise_multiplier must be finite and >= 0, "
                         f"got noise_multiplier={noise_multiplier!r}")
    if not (math.isfinite(sigma_b) and sigma_b >= 0):
        raise ValueError(f"adaptive_noise_split: count_stddev must be finite and >= 0, got "
                         f"count_stddev={count_stddev!r}")
    if z == 0.0:
        return 0.0
    if not sigma_b > z / 2:
        raise ValueError(
            f"adaptive clipping: count_stddev must be > noise_multiplier / 2 = {z / 2!r} "
            f"(Andrew et al. 2021, Theorem 1: z_Delta = (z^-2 - (2 count_stddev)^-2)^(-1/2) "
            f"must be finite), got count_stddev={count_stddev!r}")
    # z / sqrt(1 - (z / (2 sigma_b))^2): the same number, without overflow for tiny z.
    return z / math.sqrt(1.0 - (z / (2.0 * sigma_b)) ** 2)


def _values(value) -> tuple[float, ...]:
    """The concrete number(s) behind ``value``: itself, or -- a value swept over a
    sweep's vmapped members (``fedjax_lite.experiment.swept``) -- every member's."""
    host = getattr(value, "host", None)
    return tuple(host) if host is not None else (float(value),)


def _checked(name: str, value, ok, allowed: str):
    """``value`` (a float, or a swept value left traced) after checking every concrete
    value behind it with ``ok``."""
    if not all(math.isfinite(v) and ok(v) for v in _values(value)):
        raise ValueError(f"dp_gaussian: {name} must be finite and {allowed}, got "
                         f"{name}={value!r}")
    return value if hasattr(value, "host") else float(value)


def _check_positive(name: str, value: float) -> float:
    return _checked(name, value, lambda v: v > 0, "> 0")


def dp_gaussian(clip_norm: float, noise_multiplier: float, expected_clients: float, *,
                adaptive: AdaptiveClipping | None = None) -> Aggregator:
    """DP-FedAvg's Gaussian mechanism (see the module docstring for the privacy model).

    Args:
      clip_norm: S, the L2 bound on each client's whole update (with ``adaptive``: the
        initial clip norm S_0).
      noise_multiplier: z, the overall noise multiplier to account for. Without
        ``adaptive`` the update noise std is z S; with it, z_Delta S_t where
        z_Delta = ``adaptive_noise_split(z, count_stddev)``.
      expected_clients: m, the fixed denominator: the expected number of reporting
        clients, qK, or qK(1 - p) under independent dropout with probability p (unbiased).
      adaptive: turn on adaptive clipping (Andrew et al. 2021); the clip norm becomes
        ``agg_state.clip_norm``.

    ``agg_state`` is ``()`` without ``adaptive``, else ``AdaptiveClipState``.
    Metrics (float32 scalars): ``clip_norm`` (S used this round), ``noise_std`` (per
    coordinate, on the averaged update), ``clipped_fraction`` (exact, NOT private: a
    diagnostic), ``nonfinite_clients`` (NOT private), ``num_reporting``,
    ``no_client_reported``; with ``adaptive`` also ``clipped_fraction_noisy`` = 1 - b~,
    the private estimate, safe to log.
    """
    S0 = _check_positive("clip_norm", clip_norm)
    denom = _check_positive("expected_clients", expected_clients)
    z = _checked("noise_multiplier", noise_multiplier, lambda v: v >= 0, ">= 0")

    if adaptive is not None:
        gamma, eta = float(adaptive.target_quantile), float(adaptive.learning_rate)
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"dp_gaussian: adaptive.target_quantile must be in (0, 1), got "
                             f"target_quantile={adaptive.target_quantile!r}")
        if not (math.isfinite(eta) and eta > 0):
            raise ValueError(f"dp_gaussian: adaptive.learning_rate must be finite and > 0, "
                             f"got learning_rate={adaptive.learning_rate!r}")
        sigma_b = (denom / 20.0 if adaptive.count_stddev is None
                   else float(adaptive.count_stddev))
        z_delta = adaptive_noise_split(z, sigma_b)
    else:
        z_delta = z

    def init(params_like):
        del params_like
        if adaptive is None:
            return ()
        return AdaptiveClipState(jnp.asarray(S0, jnp.float32))

    def partial(deltas, weights, state):
        return clipped_sums(deltas, weights, S0 if adaptive is None else state.clip_norm)

    def finalize(sums, state, key):
        total, unravel = ravel_pytree(sums["sum"])      # sum_k clip(Delta_k, S_t), flat
        dtype = total.dtype
        s_t = S0 if adaptive is None else state.clip_norm
        noise_key = jax.random.fold_in(key, DP_NOISE_STREAM)
        if adaptive is None:
            # the same operations as before, so the released noise is bit-identical
            noise = jax.random.normal(noise_key, total.shape, dtype) * (z * S0)
        else:
            noise = jax.random.normal(noise_key, total.shape, dtype) * (
                z_delta * s_t).astype(dtype)
        out = (total + noise) / denom

        m_f = sums["m"].astype(jnp.float32)
        metrics = {
            "clip_norm": jnp.asarray(s_t, jnp.float32),
            "noise_std": jnp.asarray(z_delta * s_t / denom, jnp.float32),
            **clipped_sums_metrics(sums),
        }
        if adaptive is not None:
            # b_k, reporting clients only
            centred = sums["unclipped"].astype(jnp.float32) - 0.5 * m_f
            count_noise = sigma_b * jax.random.normal(
                jax.random.fold_in(key, DP_COUNT_STREAM), (), jnp.float32)
            b_noisy = (centred + count_noise) / denom + 0.5
            new_s = s_t * jnp.exp(-eta * (b_noisy - gamma))
            info = jnp.finfo(jnp.float32)
            state = AdaptiveClipState(jnp.clip(new_s, info.tiny, info.max).astype(
                jnp.float32))
            metrics["clipped_fraction_noisy"] = (1.0 - b_noisy).astype(jnp.float32)
        return unravel(out), state, metrics

    return reduced(init, Reduction(partial, finalize), private=True)


__all__ = ["DP_COUNT_STREAM", "DP_NOISE_STREAM", "AdaptiveClipState", "AdaptiveClipping",
           "adaptive_noise_split", "dp_gaussian"]
