"""Device-side engine: local training, aggregation, the jitted round, evaluation."""

from fedjax_lite.core.aggregators import Aggregator, mean, weighted_mean
from fedjax_lite.core.evaluate import build_evaluate
from fedjax_lite.core.local import LocalStats, local_train
from fedjax_lite.core.round import (Cohort, EngineOptions, FederatedAlgorithm, build_round,
                                    client_keys, map_chunks, map_clients,
                                    map_local_training, round_key)

__all__ = ["Aggregator", "Cohort", "EngineOptions", "FederatedAlgorithm", "LocalStats",
           "build_evaluate", "build_round", "client_keys", "local_train", "map_chunks",
           "map_clients", "map_local_training",
           "mean", "round_key", "weighted_mean"]
