"""A synthetic ratings generator shaped like MovieLens-100k (host side, NumPy only, seeded).

The offline stand-in for MovieLens in tests and benchmarks. By default it reproduces
ml-100k's shape: 943 users, 1682 items, 100 000 ratings, at least 20 ratings per user,
heavy-tailed user activity (lognormal above the minimum, largest user about 7x the mean,
like ml-100k's 737 vs 106) and item popularity (lognormal weights, wider below the median
item than above it, so there is a long tail of rarely rated films but no film reaches every
user; users pick items by weighted sampling without replacement), and integer ratings 1..5
with ml-100k's histogram
(6.1%, 11.4%, 27.1%, 34.2%, 21.2%: mean 3.53, std 1.13).

Ratings come from an ordinal (thresholded) model on a biased low-rank score (Koren, Bell & Volinsky,
"Matrix factorization techniques for recommender systems", IEEE Computer 2009):

    s(u, i) = b_u + b_i + p_u . q_i          (the noiseless latent score)
    r(u, i) = level k  such that  t_{k-1} < s(u, i) + eps <= t_k,   eps ~ N(0, noise_std^2)

with b_u ~ N(0, user_bias_std^2), b_i correlated with the item's log-popularity (popular
films are rated higher, as in MovieLens), p_u, q_i ~ N(0, factor_std / sqrt(rank)) per
coordinate (so p_u . q_i has variance factor_std^2), and the cut points t chosen as
quantiles of the generated s + eps so the rating histogram matches ``proportions``.
:class:`RatingsModel` keeps the truth: ``expected_rating`` is E[r | s], the best any
predictor can do under squared error (the "oracle", i.e. the noise floor).

Calibration (defaults; random 80/20 split per user; float64 NumPy baselines fitted in
tests/test_ratings_synthetic.py, which asserts the seed-0 row loosely), beside ml-100k:

                                 seed 0    seeds 0-3        ml-100k
    rating mean / std            3.530 / 1.126              3.530 / 1.126
    histogram of 1..5 (%)        6.1 11.4 27.1 34.2 21.2    6.1 11.4 27.1 34.2 21.2
    predict the global mean      1.126     1.126-1.132      1.154 (u1)
    biases only (ALS)            0.940     0.936-0.953      0.944 (5-fold, Surprise Baseline)
    biased MF (ALS, k=10, l=15)  0.927     0.925-0.941      0.941-0.949 (u1, biased SVD)
    oracle E[r | s]              0.824     0.816-0.830      (unknown)

so, as on the real data, biases carry most of the signal, a tuned biased MF lands clearly
below 0.95, and the gap to the oracle is estimation error from ~85 ratings per user.
Timestamps have no temporal dynamics (a temporal split is statistically a random one).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fedjax_lite.data.ratings import FlatRatings, RatingsSplit
from fedjax_lite.data.ratings_split import split_ratings

# ml-100k's rating histogram: 6110, 11370, 27145, 34174, 21201 of 100 000 ratings of 1..5.
ML100K_PROPORTIONS = (0.0611, 0.1137, 0.27145, 0.34174, 0.21201)
_T0, _T1 = 874_724_710, 893_286_638  # ml-100k's first and last timestamps
_CHUNK = 1 << 20


@dataclass(frozen=True)
class RatingsModel:
    """The generator's ground truth (see the module docstring).

    Attributes:
      user_bias: float64[U]; item_bias: float64[I].
      user_factors: float64[U, k]; item_factors: float64[I, k].
      noise_std: std of eps added to the latent score before thresholding.
      thresholds: float64[L-1] cut points t_1 < ... < t_{L-1} on s + eps.
      levels: float64[L] the rating values (1..5 by default).
      popularity: float64[I] the item sampling weights (normalized).
    """

    user_bias: np.ndarray
    item_bias: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    noise_std: float
    thresholds: np.ndarray
    levels: np.ndarray
    popularity: np.ndarray

    def score(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """float64: the noiseless latent score s(u, i) for source user and item ids."""
        users, items = np.asarray(users), np.asarray(items)
        out = np.empty(users.shape, np.float64)
        fu, fi = users.reshape(-1), items.reshape(-1)
        flat = out.reshape(-1)
        for s in range(0, len(fu), _CHUNK):  # bounded memory for large batches
            u, i = fu[s:s + _CHUNK], fi[s:s + _CHUNK]
            flat[s:s + _CHUNK] = (self.user_bias[u] + self.item_bias[i] + np.einsum(
                "rk,rk->r", self.user_factors[u], self.item_factors[i]))
        return out

    def level_probabilities(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """float64[..., L]: P(r = level | s(u, i))."""
        s = self.score(users, items)[..., None]
        cdf = _normal_cdf((self.thresholds - s) / self.noise_std)
        ones = np.ones(s.shape)
        return np.diff(np.concatenate([0 * ones, cdf, ones], axis=-1), axis=-1)

    def expected_rating(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """float64: E[r | s(u, i)], the squared-error-optimal prediction (the oracle)."""
        return self.level_probabilities(users, items) @ self.levels


_erfc = np.frompyfunc(math.erfc, 1, 1)


def _normal_cdf(x: np.ndarray) -> np.ndarray:
    return 0.5 * _erfc(-np.asarray(x, np.float64) / math.sqrt(2)).astype(np.float64)


def _activity(rng, num_users, num_ratings, minimum, maximum, sigma) -> np.ndarray:
    """Ratings per user: ``minimum + c * lognormal(0, sigma)``, capped at ``maximum``, with
    c chosen (bisection) so the total is ``num_ratings`` exactly."""
    raw = rng.lognormal(0.0, sigma, num_users)
    extra = num_ratings - minimum * num_users
    lo, hi = 0.0, float(extra) / raw.min() + 1.0
    for _ in range(100):
        c = (lo + hi) / 2
        if np.minimum(minimum + c * raw, maximum).sum() < num_ratings:
            lo = c
        else:
            hi = c
    n = np.minimum(np.floor(minimum + lo * raw), maximum).astype(np.int64)
    short = num_ratings - int(n.sum())  # hand out the rounding remainder
    if short > 0:
        room = np.flatnonzero(n < maximum)
        n[rng.choice(room, size=short, replace=False, p=raw[room] / raw[room].sum())] += 1
    return n


def _alias_table(p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Walker's alias table (Vose's construction) for O(1) draws from ``p``."""
    k = len(p)
    prob, alias = p * k, np.arange(k)
    small = list(np.flatnonzero(prob < 1.0))
    large = list(np.flatnonzero(prob >= 1.0))
    while small and large:  # O(k) host loop, once per generated dataset
        s, g = small.pop(), large.pop()
        alias[s] = g
        prob[g] -= 1.0 - prob[s]
        (small if prob[g] < 1.0 else large).append(g)
    prob[small + large] = 1.0
    return prob, alias


def _pick_items(rng, n: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Each user u draws n[u] distinct items by successive weighted sampling without
    replacement. Light users: the distinct items of an i.i.d. weighted stream, in order of
    first appearance (that is exactly successive sampling), the stream sized from the
    expected number of distinct draws and extended for the few who fall short. Heavy users
    (stream longer than the catalogue): exponential keys E_i / w_i, smallest n[u] kept
    (Efraimidis & Spirakis 2006), a batch of users at a time."""
    num_items = len(weights)
    p = weights / weights.sum()
    prob, alias = _alias_table(p)
    grid = np.unique(np.geomspace(1, 64 * num_items, 400).astype(np.int64))
    distinct = np.array([-np.expm1(m * np.log1p(-np.minimum(p, 1 - 1e-16))).sum()
                         for m in grid])
    need = np.interp(n, distinct, grid, right=np.inf)
    heavy = need > num_items
    users_out, items_out = [], []
    todo, factor = np.flatnonzero(~heavy), 1.05
    while len(todo):
        m = np.ceil(need[todo] * factor).astype(np.int64) + 4
        su = np.repeat(todo, m)  # the stream, grouped by user
        si = rng.integers(0, num_items, len(su))
        si = np.where(rng.random(len(su)) < prob[si], si, alias[si])
        key = su * num_items + si
        order = np.argsort(key, kind="stable")
        key = key[order]
        first = np.zeros(len(su), bool)
        first[order[np.r_[True, key[1:] != key[:-1]]]] = True
        fu, fi = su[first], si[first]  # first appearances, in stream order
        counts = np.bincount(fu, minlength=len(n))[todo]
        done = counts >= n[todo]
        rank = np.arange(len(fu)) - np.repeat(np.cumsum(counts) - counts, counts)
        keep = (rank < n[fu]) & np.repeat(done, counts)
        users_out.append(fu[keep])
        items_out.append(fi[keep])
        todo, factor = todo[~done], factor * 2
    rows = np.flatnonzero(heavy)
    batch = max(1, (1 << 24) // num_items)
    for s in range(0, len(rows), batch):
        r = rows[s:s + batch]
        order = np.argsort(rng.exponential(size=(len(r), num_items)) / p, axis=1)
        take = np.arange(num_items)[None, :] < n[r][:, None]
        users_out.append(np.broadcast_to(r[:, None], take.shape)[take])
        items_out.append(order[take])
    users, items = np.concatenate(users_out), np.concatenate(items_out)
    order = np.argsort(users, kind="stable")
    return users[order], items[order]


def generate_ratings(num_users: int = 943, num_items: int = 1682,
                     num_ratings: int = 100_000, *, rank: int = 10, seed: int = 0,
                     min_user_ratings: int = 20, max_user_ratings: int | None = None,
                     activity_sigma: float = 1.0,
                     popularity_sigma: tuple[float, float] = (2.5, 1.3),
                     user_bias_std: float = 0.45, item_bias_std: float = 0.5,
                     popularity_bias_corr: float = 0.5, factor_std: float = 0.45,
                     noise_std: float = 0.78,
                     proportions: tuple[float, ...] = ML100K_PROPORTIONS,
                     ) -> tuple[FlatRatings, RatingsModel]:
    """All ratings of a synthetic population and the model that generated them.

    Users are 0..num_users-1 and items 0..num_items-1 (source ids = model indices).
    ``max_user_ratings`` defaults to min(num_items, 7 x the mean per user). Vectorized:
    100 000 users x 10 000 items x 100 ratings per user take a few seconds.

    Returns:
      (FlatRatings with integer ratings on (1, L) and timestamps, RatingsModel).
    """
    if num_users < 1 or num_items < 2 or rank < 1:
        raise ValueError(f"need num_users >= 1, num_items >= 2, rank >= 1; got {num_users}, "
                         f"{num_items}, {rank}")
    props = np.asarray(proportions, np.float64)
    if len(props) < 2 or (props <= 0).any() or abs(props.sum() - 1) > 1e-6:
        raise ValueError(f"proportions {proportions} must be >= 2 positive shares summing "
                         "to 1")
    cap = max_user_ratings or int(min(num_items, round(7 * num_ratings / num_users)))
    cap = min(cap, num_items)
    if not num_users * min_user_ratings <= num_ratings <= num_users * cap:
        raise ValueError(f"num_ratings={num_ratings} must lie in [{num_users * min_user_ratings}"
                         f", {num_users * cap}] for {num_users} users with "
                         f"{min_user_ratings}..{cap} ratings each")
    rng = np.random.default_rng([seed, 0x7A71])
    n = _activity(rng, num_users, num_ratings, min_user_ratings, cap, activity_sigma)
    z_pop = rng.standard_normal(num_items)
    weights = np.exp(np.where(z_pop < 0, popularity_sigma[0], popularity_sigma[1]) * z_pop)
    user, item = _pick_items(rng, n, weights)

    user_bias = rng.normal(0.0, user_bias_std, num_users)
    item_bias = item_bias_std * (popularity_bias_corr * z_pop + math.sqrt(
        1 - popularity_bias_corr ** 2) * rng.standard_normal(num_items))
    scale = math.sqrt(factor_std) / rank ** 0.25  # var(p . q) = rank * scale^4 = factor_std^2
    user_factors = rng.normal(0.0, scale, (num_users, rank))
    item_factors = rng.normal(0.0, scale, (num_items, rank))
    levels = np.arange(1, len(props) + 1, dtype=np.float64)
    model = RatingsModel(user_bias, item_bias, user_factors, item_factors, float(noise_std),
                         np.zeros(len(props) - 1), levels, weights / weights.sum())
    noisy = model.score(user, item) + rng.normal(0.0, noise_std, len(user))
    thresholds = np.quantile(noisy, np.cumsum(props)[:-1])
    model = RatingsModel(user_bias, item_bias, user_factors, item_factors, float(noise_std),
                         thresholds, levels, model.popularity)
    rating = levels[np.searchsorted(thresholds, noisy)].astype(np.float32)

    # Each user is active over a window inside ml-100k's seven months; ratings uniform in it.
    start = rng.uniform(_T0, _T1, num_users)
    length = np.minimum(np.exp(rng.normal(math.log(86_400.0), 2.5, num_users)), _T1 - start)
    timestamp = (start[user] + rng.random(len(user)) * length[user]).astype(np.int64)
    flat = FlatRatings(user.astype(np.int64), item.astype(np.int64), rating,
                       (float(levels[0]), float(levels[-1])), timestamp, "synthetic_ratings")
    return flat, model


def synthetic_ratings(num_users: int = 943, num_items: int = 1682,
                      num_ratings: int = 100_000, *, rank: int = 10, seed: int = 0,
                      split: str = "random", test_fraction: float = 0.2,
                      heldout_users: float = 0.0, noise_std: float = 0.78,
                      max_user_ratings: int | None = None,
                      timestamps: bool = False) -> RatingsSplit:
    """``generate_ratings`` followed by ``split_ratings(kind=split, ...)`` (same seed).

    ``max_user_ratings`` caps the generator's per-user activity (it bounds the padding).
    ``timestamps``: keep the (dynamics-free) timestamps in the returned rows; the temporal
    and leave-one-out splits use them either way. For the ground truth, call
    :func:`generate_ratings` and :func:`split_ratings` yourself.
    """
    flat, _ = generate_ratings(num_users, num_items, num_ratings, rank=rank, seed=seed,
                               noise_std=noise_std, max_user_ratings=max_user_ratings)
    return split_ratings(flat, split, test_fraction=test_fraction, seed=seed,
                         heldout_users=heldout_users, check_duplicates=False,
                         keep_timestamps=timestamps)
