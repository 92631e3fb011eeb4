"""From a validated :class:`Config` to a federated recommender: ratings data (each user one
client), the biased MF model, FCF with its sparse aggregator, and RMSE evaluation."""

from __future__ import annotations

import jax

from fedjax_lite.core import EngineOptions, FederatedAlgorithm
from fedjax_lite.experiment.builders import build_faults, build_optimizer, dp_denominator
from fedjax_lite.experiment.config import Config
from fedjax_lite.models.mf import MatrixFactorization


def build_ratings_data(config: Config):
    """(train, test, split) for ``synthetic_ratings`` / ``movielens`` data: row u of train
    and test is the same user; ``split`` carries the counts (unseen test items, ...)."""
    d = config.data
    if d.kind == "movielens":
        from fedjax_lite.data.movielens import load_movielens
        split = load_movielens(d.path, split=d.split, test_fraction=d.test_fraction,
                               seed=config.seed)
    else:
        from fedjax_lite.data.ratings_synthetic import synthetic_ratings
        split = synthetic_ratings(num_users=d.num_users, num_items=d.num_items,
                                  num_ratings=d.num_ratings, split=d.split,
                                  test_fraction=d.test_fraction, seed=config.seed)
    if config.algorithm.clients_per_round > split.train.num_users:
        raise ValueError(f"clients_per_round={config.algorithm.clients_per_round} is larger "
                         f"than the population ({split.train.num_users} users)")
    return split.train, split.test, split


def build_mf(config: Config, train) -> MatrixFactorization:
    m = config.model
    return MatrixFactorization(num_items=int(train.num_items), dim=m.dim, l2=m.l2,
                               init_scale=m.init_scale, scale=tuple(train.scale))


def build_recommender(config: Config, model: MatrixFactorization, engine: EngineOptions, *,
                      num_users: int, init_key: jax.Array, privacy=None
                      ) -> FederatedAlgorithm:
    """FCF or FedRecon with ``sparse_mean`` (aggregator mean) or the sparse Gaussian
    mechanism (aggregator dp_gaussian, with the run's resolved noise multiplier)."""
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
    if a.name == "fedrecon":
        from fedjax_lite.algorithms.fedrecon import fedrecon
        return fedrecon(model, recon_steps=a.recon_steps,
                        support_fraction=a.support_fraction, **common)
    from fedjax_lite.algorithms.fcf import fcf
    return fcf(model, num_users=num_users, init_key=jax.random.fold_in(init_key, 1),
               **common)


def build_rating_evaluation(config: Config, model: MatrixFactorization, init_key: jax.Array):
    """``evaluate(state, train, test)``: FCF predicts with the users' stored private
    factors; FedRecon reconstructs them from each user's training ratings first."""
    if config.algorithm.name == "fedrecon":
        from fedjax_lite.algorithms.fedrecon import evaluate_train_test
        a = config.algorithm
        return evaluate_train_test(model, recon_steps=a.recon_steps,
                                   recon_optimizer=build_optimizer(a.client_optimizer),
                                   batch_size=a.batch_size,
                                   support_fraction=a.support_fraction,
                                   key=jax.random.fold_in(init_key, 2))
    from fedjax_lite.algorithms.fcf import evaluate_ratings
    evaluate = evaluate_ratings(model)
    return lambda state, train, test: evaluate(state, test)


__all__ = ["build_mf", "build_rating_evaluation", "build_ratings_data", "build_recommender"]
