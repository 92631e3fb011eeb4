"""From a validated :class:`Config` to a federated recommender: ratings data (each user one
client), the biased MF model, FCF with its sparse aggregator, and RMSE evaluation."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax

from fedjax_lite.core import EngineOptions, FederatedAlgorithm
from fedjax_lite.experiment.builders import build_faults, build_optimizer, dp_denominator
from fedjax_lite.experiment.config import RECOMMENDATION_BASELINES, Config
from fedjax_lite.models.mf import MatrixFactorization



class RecsysData(NamedTuple):
    """What a recommender run trains and evaluates on (row u = the same user in each).

    train: the population the method trains on (the implicit objective: positives and
      sampled negatives, labels 1/0); test: held-out ratings; rated: the items each user
      rated in training (excluded from the full ranking); negatives: int32[U, n] items
      the user never rated, sampled once per run (ranking runs; else None); split: the
      RatingsSplit (counts of unseen test items, ...)."""
    train: Any
    test: Any
    rated: Any
    negatives: Any
    split: Any


def build_ratings_data(config: Config) -> RecsysData:
    """The ratings of ``synthetic_ratings`` / ``movielens`` data, split per user, plus
    what the objective and the ranking metrics need."""
    d = config.data
    seed = config.data_seed
    if d.kind == "movielens":
        from fedjax_lite.data.movielens import load_movielens
        split = load_movielens(d.path, split=d.split, test_fraction=d.test_fraction,
                               seed=seed)
    else:
        from fedjax_lite.data.ratings_synthetic import synthetic_ratings
        split = synthetic_ratings(num_users=d.num_users, num_items=d.num_items,
                                  num_ratings=d.num_ratings, split=d.split,
                                  test_fraction=d.test_fraction, seed=seed)
    if config.algorithm.clients_per_round > split.train.num_users:
        raise ValueError(f"clients_per_round={config.algorithm.clients_per_round} is larger "
                         f"than the population ({split.train.num_users} users)")
    train, negatives = split.train, None
    if config.eval.ranking or config.model.objective == "bce":
        from fedjax_lite.data import ratings_negatives as rn
        if config.eval.ranking:
            negatives = rn.sample_negatives(split.train, split.test, config.eval.negatives,
                                            seed=seed)
        if config.model.objective == "bce":
            train = rn.implicit_training(split.train, config.model.train_negatives,
                                         seed=seed + 1, exclude=split.test)
    return RecsysData(train, split.test, split.train, negatives, split)


def build_mf(config: Config, train) -> MatrixFactorization:
    m = config.model
    return MatrixFactorization(num_items=int(train.num_items), dim=m.dim, l2=m.l2,
                               init_scale=m.init_scale, scale=tuple(train.scale),
                               objective=m.objective)


def plain_sgd_lr(opt) -> float | None:
    """The learning rate of a client optimizer that is plain SGD (no momentum, no
    Nesterov), whose local steps can move only the batch's item rows; else None."""
    kw = opt.kwargs
    if opt.name != "sgd" or kw.get("momentum") is not None or kw.get("nesterov"):
        return None
    lr = kw.get("learning_rate")
    return None if lr is None else float(lr)


def build_recommender(config: Config, model: MatrixFactorization, engine: EngineOptions, *,
                      train, init_key: jax.Array, privacy=None) -> FederatedAlgorithm:
    """FCF or FedRecon with ``sparse_mean`` (aggregator mean) or the sparse Gaussian
    mechanism (aggregator dp_gaussian, with the run's resolved noise multiplier); or one
    of the non-federated references (``centralized``, ``local_only``). ``train``: the
    training population (its shape and rating count are static)."""
    num_users = train.num_users
    from fedjax_lite.core.sparse import sparse_mean
    from fedjax_lite.privacy.sparse_dp import dp_sparse_gaussian
    a, g = config.algorithm, config.aggregator
    if g.name == "dp_gaussian":
        aggregator = dp_sparse_gaussian(model.num_items, g.clip_norm,
                                        privacy.noise_multiplier, dp_denominator(config))
    else:
        aggregator = sparse_mean(model.num_items, a.item_aggregation)
    common = dict(client_optimizer=build_optimizer(a.client_optimizer),
                  server_optimizer=build_optimizer(a.server_optimizer),
                  local_epochs=a.local_epochs, batch_size=a.batch_size,
                  weighting=a.weighting, item_aggregation=a.item_aggregation,
                  aggregator=aggregator, faults=build_faults(config, num_users),
                  engine=engine)
    row_lr = plain_sgd_lr(a.client_optimizer)
    if a.name in RECOMMENDATION_BASELINES:
        from fedjax_lite.algorithms import mf_baselines
        key = jax.random.fold_in(init_key, 1)
        if a.name == "centralized":
            return mf_baselines.centralized(
                model, num_users=num_users, num_ratings=train.num_ratings, init_key=key,
                optimizer=common["client_optimizer"], epochs_per_round=a.local_epochs,
                batch_size=a.batch_size)
        return mf_baselines.local_only(
            model, num_users=num_users, num_slots=int(train.item.shape[1]), init_key=key,
            client_optimizer=common["client_optimizer"], local_epochs=a.local_epochs,
            batch_size=a.batch_size, engine=engine, row_sgd_lr=row_lr)
    if a.name == "fedrecon":
        from fedjax_lite.algorithms.fedrecon import fedrecon
        return fedrecon(model, recon_steps=a.recon_steps,
                        support_fraction=a.support_fraction, row_sgd_lr=row_lr, **common)
    from fedjax_lite.algorithms.fcf import fcf
    return fcf(model, num_users=num_users, init_key=jax.random.fold_in(init_key, 1),
               row_sgd_lr=row_lr, **common)


def build_evaluation(config: Config, model: MatrixFactorization, init_key: jax.Array,
                     engine: EngineOptions):
    """``evaluate(state, train, test, rated, negatives) -> (metrics, per_user)``
    (:func:`fedjax_lite.algorithms.recsys_eval.evaluate_recommender`) with the method's
    user factors: stored (fcf, centralized), the user's own (local_only) or reconstructed
    from its training ratings (fedrecon)."""
    from fedjax_lite.algorithms import recsys_eval
    a = config.algorithm
    if a.name == "fedrecon":
        from fedjax_lite.algorithms.fedrecon import reconstruct_users
        recon = reconstruct_users(model, recon_steps=a.recon_steps,
                                  recon_optimizer=build_optimizer(a.client_optimizer),
                                  batch_size=a.batch_size, key=jax.random.fold_in(init_key, 2),
                                  engine=engine)
        factors = lambda state, train: recon(state.params, train)
    elif a.name == "local_only":
        from fedjax_lite.algorithms.mf_baselines import local_only_factors
        factors = lambda state, train: local_only_factors(state)
    else:
        factors = lambda state, train: recsys_eval.stored_factors(state)
    return recsys_eval.evaluate_recommender(model, factors, ranking=config.eval.ranking)


__all__ = ["RecsysData", "build_evaluation", "build_mf", "build_ratings_data",
           "build_recommender"]
