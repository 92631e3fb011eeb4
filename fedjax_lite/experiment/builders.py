"""From a validated :class:`Config` to data, model, optimizers and the algorithm."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedjax_lite import data as fdata
from fedjax_lite.algorithms import ditto, fedavg, fednova, fedprox, fedsgd, scaffold
from fedjax_lite.core import (EngineOptions, FederatedAlgorithm, aggregators, client_mesh,
                              compression)
from fedjax_lite.core.aggregators import Aggregator
from fedjax_lite.core.faults import Faults
from fedjax_lite.core.sampling import poisson_bound, poisson_bound_tail
from fedjax_lite.experiment import config as cfg
from fedjax_lite.experiment.config import (Config, EngineConfig, FedProxSyntheticData,
                                           NpzData, OptimizerConfig, SyntheticLogisticData)
from fedjax_lite.models import Model, logistic_regression, multinomial_logistic_regression


def build_data(config: Config) -> tuple[fdata.Population, fdata.Population]:
    """(train, test) populations; validated (raises ValueError naming the problem)."""
    d = config.data
    # the data's seed: runs with different seeds can share one population (a sweep)
    seed = config.data_seed
    split_rng = np.random.default_rng([seed, 1])

    def split(pop):
        if test_split(config) == "clients":
            return fdata.split_clients(pop, d.test_fraction, seed)
        return fdata.split_examples(pop, d.test_fraction, split_rng)

    if isinstance(d, SyntheticLogisticData):
        pop = fdata.synthetic_logistic(
            num_clients=d.num_clients, num_features=d.num_features,
            mean_examples=d.mean_examples, size_sigma=d.size_sigma,
            min_examples=d.min_examples, feature_shift=d.feature_shift,
            label_noise=d.label_noise, seed=seed)
        train, test = split(pop)
    elif isinstance(d, FedProxSyntheticData):
        pop = fdata.fedprox_synthetic(alpha=d.alpha, beta=d.beta, iid=d.iid,
                                      num_clients=d.num_clients, num_features=d.num_features,
                                      num_classes=d.num_classes, seed=seed)
        train, test = split(pop)
    elif isinstance(d, NpzData):
        k = config.num_classes
        if d.test_path:
            train = fdata.load_npz(d.path, num_classes=k)
            test = fdata.load_npz(d.test_path, num_classes=k, allow_empty=True,
                                  require_client=False)
            if test.feature_shape != train.feature_shape:
                raise ValueError(f"{d.test_path}: feature shape {test.feature_shape} differs "
                                 f"from {d.path}'s {train.feature_shape}")
        else:
            train, test = split(fdata.load_npz(d.path, num_classes=k))
    elif isinstance(d, (cfg.LeafData, cfg.SklearnDigitsData)):
        train, test = _example_data(config, seed)
    else:  # pragma: no cover -- config validation rules this out
        raise TypeError(type(d))
    fdata.check_cohort_size(train, config.algorithm.clients_per_round)
    return train, test


def _example_data(config: Config, seed: int) -> tuple[fdata.Population, fdata.Population]:
    """data.kind leaf or sklearn_digits, with the data seed ``seed`` (data.seed, else the
    run's seed); ConfigError when the data contradicts a key."""
    d = config.data
    if isinstance(d, cfg.SklearnDigitsData):
        p = d.partition
        try:
            return fdata.federated_digits(
                num_clients=d.num_clients, partition_kind=p.kind,
                test_fraction=d.test_fraction, seed=seed, alpha=p.alpha,
                shards_per_client=p.shards_per_client, sigma=p.sigma,
                test_split=d.test_split)
        except ValueError as e:            # more clients (or shards) than examples
            keys = "'data.num_clients'" + (", 'data.partition.shards_per_client'"
                                           if p.kind == "shards" else "")
            raise cfg.ConfigError(f"config key {keys}: {e}") from None
    ds = fdata.load_leaf(d.path, d.test_path, vocab_size=d.vocab_size)
    if ds.num_classes > config.num_classes:
        key = "model.kind" if config.model.kind == "logistic_regression" else "model.num_classes"
        raise cfg.ConfigError(
            f"config key '{key}': the model has {config.num_classes} classes but the "
            f"{ds.kind} data at {d.path} needs {ds.num_classes} (labels 0..{ds.num_classes - 1})"
            + ("; use multinomial_logistic_regression" if key == "model.kind" else ""))
    if ds.test is not None:
        return ds.train, ds.test
    if test_split(config) == "clients":
        return fdata.split_clients(ds.train, d.test_fraction, seed)
    return fdata.split_examples(ds.train, d.test_fraction, np.random.default_rng([seed, 1]))


def cohort_bound(config: cfg.Config, K: int, ledger) -> tuple[int, float]:
    """(static cohort size, per-round overflow probability) of a run on K clients.

    Poisson sampling pads its cohort to the smallest size exceeded with probability at
    most 1e-12 per round -- in a DP run also at most ``ledger.overflow_tail``: an
    overflow stop costs at most (1 + e^eps) R p of delta, kept below delta / 10 -- or
    to ``algorithm.max_cohort_size`` (refused in a DP run when too small). Sets the
    ledger's ``overflow_p``."""
    C = config.algorithm.clients_per_round
    if config.algorithm.sampling != "poisson":
        return C, 0.0
    tail = 1e-12 if ledger is None else min(1e-12, ledger.overflow_tail(config.rounds))
    bound, overflow_p = poisson_bound(K, C / K, tail)
    least = bound
    if config.algorithm.max_cohort_size:
        bound = config.algorithm.max_cohort_size
        overflow_p = poisson_bound_tail(K, C / K, bound)
        if ledger is not None and overflow_p > ledger.overflow_tail(config.rounds):
            raise cfg.ConfigError(
                f"config key 'algorithm.max_cohort_size': {bound} is exceeded with "
                f"probability {overflow_p:.2g} per round, which would add more than "
                f"delta / 10 to delta; use at least {least} or leave it null")
    if ledger is not None:
        ledger.overflow_p = overflow_p
    return bound, overflow_p


def test_split(config: Config) -> str:
    """``data.test_split`` resolved: ``auto`` holds out whole clients in DP runs (the
    guarantee is over the training population: its examples must not be evaluated)."""
    chosen = config.data.test_split
    if chosen == "auto":
        return "clients" if config.is_private else "examples"
    return chosen


def build_model(config: Config, feature_shape: tuple[int, ...]) -> Model:
    num_features = int(np.prod(feature_shape))
    m = config.model
    if m.kind == "logistic_regression":
        return logistic_regression(num_features)
    if m.kind == "mlp":              # flax models: imported here (flax loads in ~0.2 s)
        from fedjax_lite.models.mlp import mlp
        return mlp(feature_shape, m.hidden, m.num_classes)
    if m.kind == "cnn":
        from fedjax_lite.models.cnn import cnn
        try:
            return cnn(feature_shape, m.num_classes, channels=m.channels, dense=m.dense)
        except ValueError as e:      # the data's examples are not images
            raise cfg.ConfigError(f"config key 'model.kind': {e}") from None
    return multinomial_logistic_regression(num_features, m.num_classes)


def build_optimizer(opt: OptimizerConfig) -> optax.GradientTransformation:
    return getattr(optax, opt.name)(**opt.kwargs)


# On CPUs a chunk of 64 equal-sized clients keeps its data in cache (benchmarks/
# throughput.py); when client sizes are skewed, smaller chunks of size-sorted clients run
# fewer padded steps (benchmarks/skewed.py: 8 was 3.7x faster than 64 on Synthetic(1,1)).
CPU_CHUNK, CPU_CHUNK_SKEWED, SKEW_RATIO = 64, 8, 4.0


def auto_chunk_size(sizes: np.ndarray | None) -> int | None:
    """``engine.chunk_size: auto``: the whole cohort on accelerators; on CPUs 64 clients,
    or 8 when the population is skewed (largest client > 4x the median)."""
    if jax.default_backend() != "cpu":
        return None
    if sizes is not None and len(sizes) and sizes.max() > SKEW_RATIO * np.median(sizes):
        return CPU_CHUNK_SKEWED
    return CPU_CHUNK


def engine_options(engine: EngineConfig, sizes: np.ndarray | None = None) -> EngineOptions:
    """``sizes``: the population's example counts (for ``chunk_size: auto``)."""
    chunk = engine.chunk_size
    if chunk == "auto":
        chunk = auto_chunk_size(sizes)
    elif chunk == "all":
        chunk = None
    available = jax.local_devices()
    count = len(available) if engine.devices == "auto" else engine.devices
    if count > len(available):
        raise cfg.ConfigError(f"config key 'engine.devices': {count} requested but only "
                              f"{len(available)} available ({available[0].platform})")
    mesh = client_mesh(available[:count]) if count > 1 else None
    return EngineOptions(chunk_size=chunk, unroll=engine.unroll, mesh=mesh,
                         group_by_size=engine.group_by_size, backend=engine.backend,
                         micro_cohort=engine.micro_cohort)


def dp_denominator(config: Config) -> float:
    """The fixed denominator of the DP mechanisms: ``expected`` = clients_per_round,
    ``expected_reporting`` = clients_per_round * (1 - clients.dropout)."""
    C = float(config.algorithm.clients_per_round)
    if config.aggregator.denominator == "expected_reporting":
        return C * (1.0 - config.clients.dropout)
    return C


def build_aggregator(config: Config, privacy=None) -> Aggregator:
    """The configured aggregator. DP aggregators take the run's resolved
    ``fedjax_lite.privacy.accounting.PrivacySetup`` (its noise multiplier and DP-FTRL's
    tree length are the ones the epsilon is accounted for); without one, the config's
    values (noise multiplier null: 1.0)."""
    g = config.aggregator
    if g.name == "mean":
        return aggregators.mean()
    if g.name == "median":
        return aggregators.median()
    if g.name == "geometric_median":
        return aggregators.geometric_median(max_iters=g.max_iters)
    if g.name == "trimmed_mean":
        return aggregators.trimmed_mean(g.trim)
    if g.name == "krum":
        return aggregators.krum(g.num_byzantine)
    if g.name == "multi_krum":
        return aggregators.multi_krum(g.num_byzantine, g.num_selected)
    if g.name == "norm_bound":
        return aggregators.norm_bound(g.max_norm)
    from fedjax_lite.privacy import ftrl, gaussian, secagg
    C = config.algorithm.clients_per_round
    min_survivors = (g.min_survivors if g.min_survivors is not None
                     else secagg.default_min_survivors(C))
    if g.name == "secure_mean":
        return secagg.secure_mean(g.clip_value, g.bits, min_survivors=min_survivors,
                                  neighbors=g.neighbors)
    if privacy is None:
        privacy = cfg.privacy_setup(config, max(getattr(config.data, "num_clients", 0), C))
    z = privacy.noise_multiplier
    denom = dp_denominator(config)
    if g.name == "dp_ftrl":
        return ftrl.dp_ftrl(g.clip_norm, z, denom,
                            restart_every=privacy.restart_every or config.rounds)
    if g.name == "dp_secure_mean":
        return secagg.dp_secure_mean(g.clip_norm, z, denom, g.bits,
                                     min_survivors=min_survivors, neighbors=g.neighbors)
    adaptive = None
    if g.target_quantile is not None:
        adaptive = gaussian.AdaptiveClipping(target_quantile=g.target_quantile,
                                             learning_rate=g.clip_learning_rate,
                                             count_stddev=g.count_stddev)
    return gaussian.dp_gaussian(g.clip_norm, z, denom, adaptive=adaptive)


def build_faults(config: Config, num_clients: int) -> Faults:
    """The round's fault model; attackers are a fixed seeded subset of the population."""
    attack = config.attack
    attackers = None
    if attack.kind != "none":
        attackers = jnp.asarray(fdata.choose_attackers(num_clients, attack.fraction,
                                                       config.seed))
    return Faults(dropout=config.clients.dropout,
                  attack=None if attack.kind == "none" else attack.kind,
                  attackers=attackers, scale=attack.scale, noise_std=attack.noise_std,
                  compressor=build_compressor(config),
                  error_feedback=config.compression.error_feedback,
                  num_clients=num_clients)


def build_compressor(config: Config) -> compression.Compressor | None:
    c = config.compression
    if c.kind == "qsgd":
        return compression.qsgd(c.bits)
    if c.kind == "top_k":
        return compression.top_k(c.fraction)
    if c.kind == "rotated_quantization":
        return compression.rotated_quantization(c.bits)
    return None


def apply_label_attack(config: Config, train: fdata.Population) -> fdata.Population:
    if config.attack.kind != "label_flip":
        return train
    attackers = fdata.choose_attackers(train.num_clients, config.attack.fraction, config.seed)
    return fdata.flip_labels(train, attackers, config.num_classes)


def build_algorithm(config: Config, model: Model, engine: EngineOptions, *,
                    num_clients: int, privacy=None) -> FederatedAlgorithm:
    """``privacy``: the DP run's resolved PrivacySetup (see :func:`build_aggregator`)."""
    a = config.algorithm
    common = dict(aggregator=build_aggregator(config, privacy),
                  faults=build_faults(config, num_clients), engine=engine)
    client_tx = build_optimizer(a.client_optimizer)
    server_tx = build_optimizer(a.server_optimizer)
    local = dict(local_epochs=a.local_epochs, batch_size=a.batch_size)
    if a.name in ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad"):
        return fedavg(model, client_optimizer=client_tx, server_optimizer=server_tx,
                      weighting=a.weighting, **local, **common)
    if a.name == "fedprox":
        return fedprox(model, client_optimizer=client_tx, server_optimizer=server_tx,
                       mu=a.mu, straggler_fraction=a.straggler_fraction,
                       drop_stragglers=a.drop_stragglers, weighting=a.weighting,
                       **local, **common)
    if a.name == "fedsgd":
        return fedsgd(model, server_optimizer=server_tx, weighting=a.weighting, **common)
    if a.name == "ditto":
        return ditto(model, num_clients=num_clients, client_optimizer=client_tx,
                     server_optimizer=server_tx, lam=a.lam, personal_epochs=a.personal_epochs,
                     weighting=a.weighting, **local, **common)
    if a.name == "fednova":
        return fednova(model, client_optimizer=client_tx, server_optimizer=server_tx,
                       weighting=a.weighting, **local, **common)
    return scaffold(model, num_clients=num_clients, client_optimizer=client_tx,
                    client_learning_rate=a.client_optimizer.kwargs["learning_rate"],
                    server_optimizer=server_tx, **local, **common)
