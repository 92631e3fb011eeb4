"""Device-side engine: local training, aggregation, the jitted round, evaluation."""

from fedjax_lite.core import aggregators, compression
from fedjax_lite.core.aggregators import Aggregator, mean, weighted_mean
from fedjax_lite.core.evaluate import build_evaluate
from fedjax_lite.core.local import LocalStats, local_train, local_train_chunk
from fedjax_lite.core.micro import check_micro_cohort, map_reduce_cohort
from fedjax_lite.core.round import (BACKENDS, Cohort, EngineOptions, FederatedAlgorithm,
                                    build_round, build_rounds, client_keys, client_mesh,
                                    local_training_chunk, make_cohort, map_cohort, round_key)
from fedjax_lite.core.sampling import Sampling, poisson_bound, sample_cohort

__all__ = ["Aggregator", "aggregators", "compression", "BACKENDS", "Cohort", "EngineOptions",
           "FederatedAlgorithm", "LocalStats", "build_evaluate", "build_round",
           "build_rounds",
           "check_micro_cohort", "client_keys", "client_mesh", "local_train",
           "local_train_chunk", "local_training_chunk", "make_cohort", "map_cohort",
           "map_reduce_cohort", "mean", "poisson_bound", "round_key", "sample_cohort",
           "Sampling", "weighted_mean"]
