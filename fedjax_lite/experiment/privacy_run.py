"""What a DP run reports, and what it must not: the run-level side of
``fedjax_lite.privacy``.

* :func:`resolve` fixes the noise multiplier before anything compiles or is written:
  calibrated to ``privacy.target_epsilon`` when ``aggregator.noise_multiplier`` is null,
  else checked against it (a config that would exceed the target is refused, saying the
  epsilon it would reach).
* :class:`Ledger` gives the epsilon spent after r rounds (dp-accounting, cached) for every
  metrics row, the summary and ``compare``.
* :func:`private_metrics` keeps, in a DP run, only round metrics that are part of the
  accounted release or independent of client data. Everything else the round computes
  (train loss, the exact clipped fraction, the cohort size under Poisson sampling, the
  number of reporting clients, ...) is a function of client data outside the mechanism:
  it is dropped unless ``privacy.nonprivate_diagnostics: true`` (then the summary says the
  metrics file holds non-private diagnostics).

Evaluation metrics (``eval_*``) are computed from the released model on held-out test
clients (``data.test_split: auto`` holds out whole clients in DP runs): post-processing of
the private release on data outside the training population the neighbouring relation is
defined over. Round times depend on client data sizes: not in a DP run's rows either.
"""

from __future__ import annotations

import dataclasses
import math

from fedjax_lite.experiment import config as cfg
from fedjax_lite.privacy import accounting

# Round metrics that are part of the accounted release or data-independent constants.
PRIVATE_METRICS = frozenset({"noise_std", "clip_norm", "clipped_fraction_noisy",
                             "tree_round", "secagg_bytes_per_client"})


def resolve(config: cfg.Config, population: int) -> tuple[float, accounting.PrivacySetup]:
    """(noise multiplier, setup) for a DP run over ``population`` training clients;
    ConfigError when the config cannot meet ``privacy.target_epsilon``."""
    p, g = config.privacy, config.aggregator
    setup = cfg.privacy_setup(config, population)
    try:
        accounting.check(setup)
        if g.noise_multiplier is None and p.target_epsilon is not None:
            z = accounting.calibrate(setup, config.rounds, p.delta, p.target_epsilon)
            return z, dataclasses.replace(setup, noise_multiplier=z)
        z = 1.0 if g.noise_multiplier is None else float(g.noise_multiplier)
        setup = dataclasses.replace(setup, noise_multiplier=z)
        if p.target_epsilon is not None:
            eps = accounting.epsilon(setup, config.rounds, p.delta)
            if eps > p.target_epsilon:
                raise cfg.ConfigError(
                    f"config key 'privacy.target_epsilon': {config.rounds} rounds with "
                    f"noise_multiplier {z} reach epsilon {eps:.4g} > {p.target_epsilon} "
                    f"(delta {p.delta}); lower rounds, raise the noise, or leave "
                    "aggregator.noise_multiplier null to calibrate it")
    except accounting.AccountingError as e:
        raise cfg.ConfigError(f"config key 'privacy': {e}") from None
    return z, setup


class Ledger:
    """Epsilon spent after r rounds, for one run's setup and delta."""

    def __init__(self, setup: accounting.PrivacySetup, delta: float,
                 target_epsilon: float | None = None):
        self.setup, self.delta, self.target = setup, delta, target_epsilon
        self._cache: dict[int, float] = {}
        self.overflow_p = 0.0      # per-round probability of a Poisson overflow stop

    def _stop_cost(self, rounds: int) -> float | None:
        """(1 + e^eps) R: an overflow stop of per-round probability p turns (eps, delta)
        into (eps, delta + (1 + e^eps) R p) -- it happens with probability <= R p under
        either neighbour. None without a guarantee (no noise)."""
        eps = self.epsilon(rounds)
        return None if eps is None else (1.0 + math.exp(min(eps, 700.0))) * rounds

    def overflow_tail(self, rounds: int) -> float:
        """The largest per-round overflow probability whose stop adds at most delta / 10
        to delta (no guarantee to protect: the default 1e-12)."""
        cost = self._stop_cost(rounds)
        return 1e-12 if cost is None else self.delta / (10.0 * cost)

    def overflow_delta(self, rounds: int) -> float | None:
        cost = self._stop_cost(rounds)
        return None if cost is None else cost * self.overflow_p

    def epsilon(self, rounds: int) -> float | None:
        """None when there is no guarantee (no noise) after >= 1 round."""
        if rounds not in self._cache:
            self._cache[rounds] = accounting.epsilon(self.setup, rounds, self.delta)
        eps = self._cache[rounds]
        return None if math.isinf(eps) else eps

    def would_exceed(self, rounds: int) -> bool:
        """True if running up to ``rounds`` rounds would spend more than the target."""
        if self.target is None:
            return False
        eps = self.epsilon(rounds)
        return eps is None or eps > self.target * (1 + 1e-9)

    def summary(self, config: cfg.Config, rounds: int) -> dict:
        s = self.setup
        return {"epsilon": self.epsilon(rounds), "delta": self.delta,
                # what a Poisson overflow stop could add to delta (<= delta / 10)
                "delta_overflow_stop": self.overflow_delta(rounds),
                "target_epsilon": self.target, "noise_multiplier": s.noise_multiplier,
                "clip_norm": config.aggregator.clip_norm,
                "adaptive_clipping": config.aggregator.target_quantile is not None,
                "mechanism": config.aggregator.name, "sampling": s.sampling,
                "sampling_probability": s.rate if s.sampling == "poisson" else None,
                "population": s.population, "clients_per_round": s.cohort_size,
                "neighboring": s.neighboring, "accountant": s.accountant,
                "restart_every": s.restart_every if s.mechanism == "ftrl" else None,
                "assumes": accounting.describe(s),
                "secure_mode": config.privacy.secure_mode,
                "threat_model": (
                    "the adversary sees the released models (every round's noised "
                    "aggregate), not the simulator's randomness"
                    + ("" if config.privacy.secure_mode else
                       "; this run drew its noise from the config's seed, so the run "
                       "folder is a simulation record, not a private release")),
                "nonprivate_diagnostics_logged": config.privacy.nonprivate_diagnostics}


def private_metrics(metrics: dict, config: cfg.Config) -> dict:
    """The subset of a round's metrics a DP run may log (see the module docstring)."""
    if not config.is_private or config.privacy.nonprivate_diagnostics:
        return metrics
    return {k: v for k, v in metrics.items() if k in PRIVATE_METRICS}


def secret_run_key(directory: str, resume: bool):
    """``privacy.secure_mode``: the run's key for sampling, local training and DP noise,
    from the OS's entropy (``os.urandom``) instead of the seed. It is kept only in
    ``directory/secret_key.npy`` (mode 0600, beside the checkpoints, which hold it too) so
    that ``--resume`` continues the same run; nothing else written mentions it."""
    import os

    import jax
    import numpy as np
    path = os.path.join(directory, "secret_key.npy")
    if resume:
        data = np.load(path, allow_pickle=False)
    else:
        os.makedirs(directory, exist_ok=True)
        data = np.frombuffer(os.urandom(8), np.uint32).copy()
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            np.save(f, data, allow_pickle=False)
    return jax.random.wrap_key_data(data)


__all__ = ["Ledger", "PRIVATE_METRICS", "private_metrics", "resolve", "secret_run_key"]
