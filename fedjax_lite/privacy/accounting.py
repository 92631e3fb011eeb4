"""Privacy accounting through Google's ``dp-accounting`` (host-side bookkeeping).

What is accounted, written down before any epsilon is printed:

* The unit of privacy is a CLIENT (user-level DP): neighbouring training populations
  differ in one client's whole local dataset.
* Every round releases the clipped sum of the cohort's updates plus Gaussian noise of std
  z * S per coordinate (S the clip norm, z the noise multiplier), divided by a FIXED
  denominator (never by a data-dependent count). The model -- and everything derived from
  it -- is post-processing of these releases.
* Sensitivity of one round's clipped sum, by neighbouring relation (``privacy.neighboring``):

  ============  ======================================================  ===========
  relation      neighbours                                              sensitivity
  ============  ======================================================  ===========
  add_remove    one population has one more client                      S
  zero_out      one client's data is replaced by a special client whose S
                update is always 0 (its participation schedule is kept)
  replace_one   one client's data is replaced by arbitrary other data   2S
  ============  ======================================================  ===========

  With replace_one the event's Gaussian gets the noise multiplier z / 2 (sensitivity 2S).
  Under add_remove the population size K (hence q = C / K) is treated as public, the
  convention of Abadi et al. (CCS 2016) and McMahan et al. (ICLR 2018); zero_out keeps K
  fixed by definition and gives the same epsilon for Poisson sampling.
* Threat model: the adversary sees the released aggregates, not the simulator's
  randomness (see ``privacy.secure_mode``).

* Sampling actually performed by the engine (``algorithm.sampling``) and the dp-accounting
  event that describes it:

  - ``poisson``: each client joins each round independently with q = C / K.
    ``PoissonSampledDpEvent(q, GaussianDpEvent(z'))``, RDP or PLD. (Add/remove and
    zero-out; replace-one only with PLD, which supports it.)
  - ``fixed``: C of K clients uniformly without replacement. Under add/remove this is NOT
    q-Poisson sampling with sensitivity S: adding one client pushes another out of a full
    cohort, so the sum moves by up to 2S, and the population size changes. We account it
    under replace-one: ``SampledWithoutReplacementDpEvent(K, C, GaussianDpEvent(z / 2))``
    (Wang, Balle, Kasiviswanathan, AISTATS 2019; RDP only -- dp-accounting's PLD rejects
    it). Add/remove with fixed cohorts is refused.
  - ``epochs``: every client exactly once per epoch of ceil(K / C) rounds, in a random
    order. No amplification is claimed: each epoch a client appears once, so the run is
    the composition of one Gaussian per epoch touched (zero-out or replace-one only:
    adding a client reshuffles everybody's schedule).

* DP-FTRL (``aggregator.name: dp_ftrl``, Kairouz et al., ICML 2021): no amplification by
  sampling. The tree over each restart's rounds releases all its nodes with noise z S per
  node; if one client contributes to at most k leaves of a tree of T leaves, the L2
  sensitivity of the node vector is at most S * ``tree_sensitivity_factor(k, T)``
  (k = 1: sqrt(ceil(log2(T + 1))), as in dp-accounting's
  ``SingleEpochTreeAggregationDpEvent``), so each tree is a ``GaussianDpEvent(z'/factor)``
  and trees compose. k is 1 per epoch touched with ``epochs`` sampling and T (every
  round, the worst case) otherwise.

Adaptive clipping keeps the overall noise multiplier z (Andrew et al. 2021, Thm. 1: the
noise of the update and of the clipped count are split so the pair has multiplier z), so it
is accounted by the same events.
"""

from __future__ import annotations

import contextlib
import logging
import math
from dataclasses import dataclass

import dp_accounting as dpa

SAMPLINGS = ("fixed", "poisson", "epochs")
NEIGHBORING = ("add_remove", "zero_out", "replace_one")
ACCOUNTANTS = ("rdp", "pld")
MECHANISMS = ("gaussian", "ftrl")

_RELATION = {"add_remove": dpa.NeighboringRelation.ADD_OR_REMOVE_ONE,
             "zero_out": dpa.NeighboringRelation.REPLACE_SPECIAL,
             "replace_one": dpa.NeighboringRelation.REPLACE_ONE}


class AccountingError(ValueError):
    """A sampling / neighbouring relation / accountant combination with no valid
    accounting here; the message says what would work."""


@dataclass(frozen=True)
class PrivacySetup:
    """Everything the epsilon of a run depends on."""
    noise_multiplier: float
    population: int                 # K, training clients
    cohort_size: int                # C = clients_per_round (expected size for poisson)
    sampling: str = "poisson"
    neighboring: str = "add_remove"
    accountant: str = "rdp"
    mechanism: str = "gaussian"
    restart_every: int | None = None   # ftrl: rounds per tree (None: one tree)

    @property
    def rate(self) -> float:
        return self.cohort_size / self.population

    @property
    def rounds_per_epoch(self) -> int:
        return -(-self.population // self.cohort_size)


def default_neighboring(sampling: str, mechanism: str = "gaussian") -> str:
    """The relation a run uses when ``privacy.neighboring`` is not given: add/remove for
    Poisson sampling, replace-one for fixed-size cohorts, zero-out for epochs and
    DP-FTRL's other schedules."""
    if sampling == "poisson":
        return "add_remove"
    if sampling == "fixed":
        return "replace_one"
    return "zero_out"


def tree_sensitivity_factor(max_participations: int, steps: int) -> float:
    """Upper bound (in units of S) on the L2 norm of one client's contribution to all
    nodes of a binary tree over ``steps`` leaves when it touches at most k leaves: at
    level h its leaves fall in nodes holding m_j <= min(k, 2^h) of them with sum m_j <= k,
    so sum m_j^2 <= k min(k, 2^h)."""
    k, depth = int(max_participations), max(1, math.ceil(math.log2(steps + 1)))
    return math.sqrt(sum(k * min(k, 2 ** h) for h in range(depth)))


def _check(setup: PrivacySetup) -> None:
    s, rel, acc, mech = setup.sampling, setup.neighboring, setup.accountant, setup.mechanism
    if s not in SAMPLINGS or rel not in NEIGHBORING or acc not in ACCOUNTANTS \
            or mech not in MECHANISMS:
        raise AccountingError(f"unknown sampling/neighboring/accountant/mechanism: "
                              f"{s!r}, {rel!r}, {acc!r}, {mech!r}")
    if not 0 < setup.cohort_size <= setup.population:
        raise AccountingError(f"cohort size {setup.cohort_size} must be in [1, population "
                              f"{setup.population}]")
    if not setup.noise_multiplier >= 0:
        raise AccountingError(f"noise multiplier must be >= 0, got {setup.noise_multiplier}")
    if rel == "add_remove" and s == "fixed":
        raise AccountingError(
            "privacy.neighboring add_remove with algorithm.sampling fixed has no valid "
            "accounting here (adding a client pushes another out of a full cohort: the sum "
            "moves by 2S); use sampling: poisson, or neighboring: replace_one")
    if rel == "add_remove" and s == "epochs":
        raise AccountingError(
            "privacy.neighboring add_remove with algorithm.sampling epochs: adding a client "
            "reshuffles every schedule; use zero_out or replace_one, or sampling: poisson")
    if mech == "gaussian" and s == "fixed" and rel == "zero_out":
        raise AccountingError("privacy.neighboring zero_out with sampling fixed is not "
                              "supported by dp-accounting; use replace_one")
    if mech == "gaussian" and s == "fixed" and acc == "pld":
        raise AccountingError("privacy.accountant pld does not support fixed-size sampling "
                              "(SampledWithoutReplacementDpEvent); use accountant: rdp, or "
                              "sampling: poisson")
    if mech == "gaussian" and s == "poisson" and rel == "replace_one" and acc == "rdp":
        raise AccountingError("privacy.accountant rdp does not support Poisson sampling "
                              "under replace_one; use accountant: pld or neighboring: "
                              "add_remove")


def _trees(setup: PrivacySetup, rounds: int) -> list[tuple[int, int]]:
    """(leaves, max participations of one client) of every DP-FTRL tree in ``rounds``."""
    per_tree = setup.restart_every or rounds
    trees = []
    for start in range(0, rounds, per_tree):
        stop = min(rounds, start + per_tree)
        if setup.sampling == "epochs":
            e = setup.rounds_per_epoch
            k = (stop - 1) // e - start // e + 1        # epochs the tree touches
        else:
            k = stop - start                              # worst case: every round
        trees.append((stop - start, k))
    return trees


def run_event(setup: PrivacySetup, rounds: int) -> dpa.DpEvent:
    """The dp-accounting event of ``rounds`` rounds of ``setup``."""
    _check(setup)
    if rounds <= 0:
        return dpa.NoOpDpEvent()
    z = setup.noise_multiplier
    if z == 0:
        return dpa.NonPrivateDpEvent()
    z_rel = z / 2.0 if setup.neighboring == "replace_one" else z
    if setup.mechanism == "ftrl":
        return dpa.ComposedDpEvent([
            dpa.GaussianDpEvent(z_rel / tree_sensitivity_factor(k, leaves))
            for leaves, k in _trees(setup, rounds)])
    if setup.sampling == "poisson":
        one = dpa.PoissonSampledDpEvent(setup.rate, dpa.GaussianDpEvent(z_rel))
        return dpa.SelfComposedDpEvent(one, rounds)
    if setup.sampling == "fixed":
        if setup.cohort_size == setup.population:      # everybody, every round
            return dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z_rel), rounds)
        one = dpa.SampledWithoutReplacementDpEvent(setup.population, setup.cohort_size,
                                                   dpa.GaussianDpEvent(z_rel))
        return dpa.SelfComposedDpEvent(one, rounds)
    epochs = -(-rounds // setup.rounds_per_epoch)     # epochs touched (each: once)
    return dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(z_rel), epochs)


def _accountant(setup: PrivacySetup):
    rel = _RELATION[setup.neighboring]
    if setup.accountant == "pld":
        return dpa.pld.PLDAccountant(neighboring_relation=rel)
    return dpa.rdp.RdpAccountant(neighboring_relation=rel)


def epsilon(setup: PrivacySetup, rounds: int, delta: float) -> float:
    """(epsilon, delta)-DP after ``rounds`` rounds (inf when z = 0 and rounds > 0)."""
    if not 0 < delta < 1:
        raise AccountingError(f"delta must be in (0, 1), got {delta}")
    event = run_event(setup, rounds)
    if isinstance(event, dpa.NoOpDpEvent):
        return 0.0
    if isinstance(event, dpa.NonPrivateDpEvent):
        return math.inf
    acc = _accountant(setup)
    if not acc.supports(event):           # guarded by _check; a bug if reached
        raise AccountingError(f"{setup.accountant} cannot account {event}")
    with _quiet_absl():
        acc.compose(event)
        return float(acc.get_epsilon(delta))


@contextlib.contextmanager
def _quiet_absl():
    """dp-accounting's RDP accountant logs a warning for every small fractional order whose
    series does not converge (it then leaves that order out, which keeps the bound valid);
    for large q or small z that is dozens of lines per call."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def check(setup: PrivacySetup) -> None:
    """Raises AccountingError if ``setup`` cannot be accounted (before a run starts)."""
    _check(setup)
    event = run_event(setup, 1) if setup.noise_multiplier > 0 else None
    if event is not None and not _accountant(setup).supports(event):
        raise AccountingError(f"accountant {setup.accountant} does not support sampling "
                              f"{setup.sampling} under {setup.neighboring}")


def calibrate(setup: PrivacySetup, rounds: int, delta: float, target_epsilon: float,
              rel_tol: float = 1e-3) -> float:
    """The smallest noise multiplier (to ``rel_tol``) whose epsilon after ``rounds``
    rounds is <= ``target_epsilon`` (epsilon decreases in z); AccountingError if none
    <= 1e4 does."""
    if not target_epsilon > 0:
        raise AccountingError(f"target epsilon must be > 0, got {target_epsilon}")
    eps = lambda z: epsilon(_with(setup, z), rounds, delta)
    lo, hi = 0.0, 1.0
    while eps(hi) > target_epsilon:
        lo, hi = hi, 2.0 * hi
        if hi > 1e4:
            raise AccountingError(f"no noise multiplier <= 1e4 reaches epsilon "
                                  f"{target_epsilon} in {rounds} rounds")
    while hi - lo > rel_tol * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (lo, mid) if eps(mid) <= target_epsilon else (mid, hi)
    return hi


def _with(setup: PrivacySetup, z: float) -> PrivacySetup:
    from dataclasses import replace
    return replace(setup, noise_multiplier=z)


def describe(setup: PrivacySetup) -> str:
    """One line naming what the epsilon assumes."""
    sampling = {"poisson": f"Poisson sampling, q = {setup.rate:.6g}",
                "fixed": f"fixed cohorts of {setup.cohort_size} of {setup.population} "
                         "without replacement",
                "epochs": f"each client once per epoch of {setup.rounds_per_epoch} rounds "
                          "(no amplification)"}[setup.sampling]
    mech = ("DP-FTRL tree aggregation" if setup.mechanism == "ftrl"
            else "Gaussian mechanism on the clipped sum")
    return (f"{mech}; {sampling}; client-level {setup.neighboring} neighbours; "
            f"dp-accounting {setup.accountant.upper()}")


__all__ = ["ACCOUNTANTS", "AccountingError", "NEIGHBORING", "PrivacySetup", "SAMPLINGS",
           "calibrate", "check", "default_neighboring", "describe", "epsilon", "run_event",
           "tree_sensitivity_factor"]
