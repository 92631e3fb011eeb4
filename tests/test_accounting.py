"""Privacy accounting (fedjax_lite.privacy.accounting) against dp-accounting called
independently here, the hand-written RDP reference, published anchors, and a hand-built
pair of neighbouring populations whose privacy loss is computed numerically in float64."""

from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest
from scipy import stats

from fedjax_lite.privacy import accounting
from fedjax_lite.privacy.accounting import PrivacySetup, calibrate, epsilon
from rdp_reference import dp_epsilon as reference_epsilon

NR = dpa.NeighboringRelation


def _dpa_epsilon(accountant, event, delta):
    accountant.compose(event)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("z,q,rounds", [(1.0, 0.05, 100), (0.7, 0.01, 1000), (2.0, 0.2, 50)])
def test_poisson_add_remove_equals_dp_accounting_rdp_and_pld(z, q, rounds):
    setup = PrivacySetup(noise_multiplier=z, population=1000, cohort_size=int(q * 1000),
                         sampling="poisson", neighboring="add_remove")
    event = dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)),
                                    rounds)
    assert epsilon(setup, rounds, 1e-5) == pytest.approx(
        _dpa_epsilon(dpa.rdp.RdpAccountant(), event, 1e-5), rel=1e-9)
    pld = PrivacySetup(**{**setup.__dict__, "accountant": "pld"})
    assert epsilon(pld, rounds, 1e-5) == pytest.approx(
        _dpa_epsilon(dpa.pld.PLDAccountant(), event, 1e-5), rel=1e-9)
    # PLD is tighter than RDP for the same run (dp-accounting: ~10-15% on FL settings)
    assert epsilon(pld, rounds, 1e-5) < epsilon(setup, rounds, 1e-5)


def test_dp_accounting_rdp_agrees_with_the_hand_written_reference_at_integer_orders():
    """An independent implementation (tests/rdp_reference.py: exact binomial expansion,
    validated against quadrature in test_privacy.py) gives the same epsilon when
    dp-accounting is restricted to the same integer orders."""
    orders = list(range(2, 65)) + [80, 96, 128, 256, 512, 1024]
    for q, z, t in [(0.05, 1.0, 100), (256 / 60000, 1.1, 14063), (0.01, 4.0, 10000)]:
        acc = dpa.rdp.RdpAccountant(orders=orders)
        got = _dpa_epsilon(acc, dpa.SelfComposedDpEvent(
            dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), t), 1e-5)
        assert got == pytest.approx(reference_epsilon(q, z, t, 1e-5).epsilon, rel=2e-3)


def test_mnist_dp_sgd_anchor():
    """q = 256/60000, z = 1.1, 60 epochs (14063 steps), delta 1e-5: about 2.6 with RDP
    (fractional orders), 3.0 with the classic conversion; PLD is tighter still."""
    setup = PrivacySetup(noise_multiplier=1.1, population=60000, cohort_size=256)
    assert epsilon(setup, 14063, 1e-5) == pytest.approx(2.6, abs=0.01)
    classic = reference_epsilon(256 / 60000, 1.1, 14063, 1e-5, conversion="classic")
    assert classic.epsilon == pytest.approx(3.0, abs=0.1)
    pld = PrivacySetup(1.1, 60000, 256, accountant="pld")
    assert 2.2 < epsilon(pld, 14063, 1e-5) < epsilon(setup, 14063, 1e-5)


def test_fixed_cohorts_are_replace_one_without_replacement_with_sensitivity_2S():
    setup = PrivacySetup(noise_multiplier=1.0, population=1000, cohort_size=50,
                         sampling="fixed", neighboring="replace_one")
    want = _dpa_epsilon(dpa.rdp.RdpAccountant(neighboring_relation=NR.REPLACE_ONE),
                        dpa.SelfComposedDpEvent(dpa.SampledWithoutReplacementDpEvent(
                            1000, 50, dpa.GaussianDpEvent(0.5)), 100), 1e-5)
    assert epsilon(setup, 100, 1e-5) == pytest.approx(want, rel=1e-9)
    # the old report (Poisson, sensitivity S) was several times smaller
    old = PrivacySetup(1.0, 1000, 50, sampling="poisson")
    assert epsilon(setup, 100, 1e-5) > 4 * epsilon(old, 100, 1e-5)


@pytest.mark.parametrize("sampling,relation,accountant", [
    ("fixed", "add_remove", "rdp"), ("fixed", "replace_one", "pld"),
    ("epochs", "add_remove", "rdp"), ("poisson", "replace_one", "rdp")])
def test_unaccountable_combinations_are_refused(sampling, relation, accountant):
    with pytest.raises(accounting.AccountingError):
        accounting.check(PrivacySetup(1.0, 1000, 50, sampling, relation, accountant))


def test_epochs_and_ftrl_compose_gaussians_without_amplification():
    # epochs: 1000 clients, 50 per round = 20 rounds per epoch; 45 rounds touch 3 epochs
    setup = PrivacySetup(2.0, 1000, 50, sampling="epochs", neighboring="zero_out")
    want = _dpa_epsilon(dpa.rdp.RdpAccountant(neighboring_relation=NR.REPLACE_SPECIAL),
                        dpa.SelfComposedDpEvent(dpa.GaussianDpEvent(2.0), 3), 1e-5)
    assert epsilon(setup, 45, 1e-5) == pytest.approx(want, rel=1e-9)
    # DP-FTRL, one tree per epoch, each client once per tree: dp-accounting's own
    # single-epoch tree aggregation event, composed over the epochs
    ftrl = PrivacySetup(2.0, 1000, 50, sampling="epochs", neighboring="zero_out",
                        mechanism="ftrl", restart_every=20)
    want = _dpa_epsilon(dpa.rdp.RdpAccountant(neighboring_relation=NR.REPLACE_SPECIAL),
                        dpa.SelfComposedDpEvent(
                            dpa.SingleEpochTreeAggregationDpEvent(2.0, 20), 3), 1e-5)
    assert epsilon(ftrl, 60, 1e-5) == pytest.approx(want, rel=1e-9)


def test_calibrate_inverts_epsilon():
    setup = PrivacySetup(1.0, 1000, 50)
    z = calibrate(setup, 100, 1e-5, 3.0)
    at = lambda v: epsilon(PrivacySetup(v, 1000, 50), 100, 1e-5)
    assert at(z) <= 3.0 < at(z * 0.99)


# ------------------------------------------- a hand-built pair of neighbouring populations

def _pair_epsilon_lower_bound(q: float, shift: float, rounds: int, delta: float) -> float:
    """Exact-to-discretization epsilon of T rounds of the 1-D pair
    P = (1 - q) N(0, 1) + q N(shift, 1)  vs  Q = N(0, 1)
    (the released coordinate along e, in units of the noise std), computed in float64 by
    discretizing the privacy loss l(x) = log p(x)/q(x) under P, ROUNDED DOWN (so the
    result is a lower bound), and composing by FFT: delta(eps) = E[(1 - e^(eps - L_T))+]."""
    h = 2e-3                                              # loss grid step
    x = np.linspace(-12.0, shift + 12.0, 400_001)
    edges = np.concatenate([[-np.inf], 0.5 * (x[1:] + x[:-1]), [np.inf]])
    mass = ((1 - q) * np.diff(stats.norm.cdf(edges))
            + q * np.diff(stats.norm.cdf(edges - shift)))
    loss = np.log1p(-q + q * np.exp(shift * x - shift ** 2 / 2))
    lo = math.floor(loss.min() / h)
    idx = np.floor(loss / h).astype(np.int64) - lo
    pmf = np.bincount(idx, weights=mass)
    n = int(2 ** math.ceil(math.log2(rounds * len(pmf))))
    composed = np.fft.irfft(np.fft.rfft(pmf, n) ** rounds, n)[: rounds * (len(pmf) - 1) + 1]
    composed = np.clip(composed, 0.0, None)
    grid = (np.arange(len(composed)) + rounds * lo) * h

    def delta_at(eps):
        above = grid > eps
        return float(np.sum(composed[above] * -np.expm1(eps - grid[above])))

    a, b = 0.0, 200.0
    for _ in range(60):
        mid = 0.5 * (a + b)
        a, b = (mid, b) if delta_at(mid) > delta else (a, mid)
    return a


def test_fixed_cohort_worst_case_pair_breaks_the_old_accounting_and_not_the_new():
    """The quickstart's DP setting: K = 1000 clients, C = 50 per round (fixed size), z = 1,
    100 rounds, delta 1e-5. Population D: every client's clipped update is -S e.
    Neighbour D' (replace one): one client sends +S e instead. The released sum along e is
    -C S + noise under D and, whenever the replaced client is in the cohort (probability
    C / K), -(C - 2) S + noise: a 2S shift. The exact epsilon of this pair is a LOWER bound
    on the true epsilon; the old report (Poisson, sensitivity S: 4.1) is below it, the
    accounting used now is above it."""
    K, C, z, rounds, delta = 1000, 50, 1.0, 100, 1e-5
    attack = _pair_epsilon_lower_bound(q=C / K, shift=2.0 / z, rounds=rounds, delta=delta)
    old = reference_epsilon(C / K, z, rounds, delta).epsilon   # what the run used to print
    new = epsilon(PrivacySetup(z, K, C, sampling="fixed", neighboring="replace_one"),
                  rounds, delta)
    assert old == pytest.approx(4.11, abs=0.01)
    assert old < attack <= new, (old, attack, new)
    assert attack > 15


def test_poisson_pair_with_shift_S_is_below_the_poisson_accounting():
    """The add/remove pair of Poisson sampling (the added client, present with probability
    q, shifts the sum by S) must never separate by more than the reported epsilon -- and
    PLD's tighter epsilon should be close to this worst case (it is exact for it)."""
    K, C, z, rounds, delta = 1000, 50, 1.0, 100, 1e-5
    attack = _pair_epsilon_lower_bound(q=C / K, shift=1.0 / z, rounds=rounds, delta=delta)
    rdp = epsilon(PrivacySetup(z, K, C), rounds, delta)
    pld = epsilon(PrivacySetup(z, K, C, accountant="pld"), rounds, delta)
    assert attack <= pld <= rdp
    assert pld < 1.1 * attack
