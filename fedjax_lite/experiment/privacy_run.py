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

Evaluation metrics (``eval_*``) are computed from the released model on the held-out test
split: post-processing of the private release on data outside the training population the
neighbouring relation is defined over.
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
                "target_epsilon": self.target, "noise_multiplier": s.noise_multiplier,
                "clip_norm": config.aggregator.clip_norm,
                "adaptive_clipping": config.aggregator.target_quantile is not None,
                "mechanism": config.aggregator.name, "sampling": s.sampling,
                "sampling_probability": s.rate if s.sampling == "poisson" else None,
                "population": s.population, "clients_per_round": s.cohort_size,
                "neighboring": s.neighboring, "accountant": s.accountant,
                "restart_every": s.restart_every if s.mechanism == "ftrl" else None,
                "assumes": accounting.describe(s),
                "nonprivate_diagnostics_logged": config.privacy.nonprivate_diagnostics}


def private_metrics(metrics: dict, config: cfg.Config) -> dict:
    """The subset of a round's metrics a DP run may log (see the module docstring)."""
    if not config.is_private or config.privacy.nonprivate_diagnostics:
        return metrics
    return {k: v for k, v in metrics.items() if k in PRIVATE_METRICS}


__all__ = ["Ledger", "PRIVATE_METRICS", "private_metrics", "resolve"]
