"""The experiment configuration's schema: frozen dataclasses with defaults, allowed
values and range checks (``field(metadata=_check(...))``). Parsing and cross-field
validation live in :mod:`fedjax_lite.experiment.config`, which re-exports everything here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from fedjax_lite.experiment.config_data import *  # noqa: F401,F403 (re-exported)
from fedjax_lite.experiment.config_data import DataConfig, SyntheticLogisticData
from fedjax_lite.experiment.config_fields import (  # noqa: F401 (SEED_MAX re-exported)
    SEED_MAX, _FRACTION, _NONNEG, _NONNEG_INT, _POS, _POS_INT, _SEED, _check)


class ConfigError(ValueError):
    """A bad configuration; the message names the offending key."""


class OutputError(ConfigError):
    """An unusable output folder (``--out``): a file, not writable, or already holding a
    run; the message names the path. A ConfigError, so existing handlers still catch it;
    the CLI reports it as ``fedjax-lite: output folder: ...`` (exit 2)."""


# ---------------------------------------------------------------------------- model

@dataclass(frozen=True)
class LogisticRegressionModel:
    kind: Literal["logistic_regression"] = "logistic_regression"


@dataclass(frozen=True)
class MultinomialLogisticRegressionModel:
    kind: Literal["multinomial_logistic_regression"] = "multinomial_logistic_regression"
    num_classes: int = field(default=10, metadata=_check(lambda v: v >= 2, "an integer >= 2"))


_WIDTHS = _check(lambda v: len(v) >= 1 and all(w > 0 for w in v),
                 "a non-empty list of positive integers")


@dataclass(frozen=True)
class MLPModel:
    """ReLU multilayer perceptron on flattened examples (fedjax_lite.models.mlp); the
    default is McMahan et al.'s (AISTATS 2017) 2NN."""
    kind: Literal["mlp"] = "mlp"
    hidden: tuple[int, ...] = field(default=(200, 200), metadata=_WIDTHS)
    num_classes: int = field(default=10, metadata=_check(lambda v: v >= 2, "an integer >= 2"))


@dataclass(frozen=True)
class CNNModel:
    """McMahan et al.'s (AISTATS 2017) CNN (fedjax_lite.models.cnn): 2 x (5x5 conv, 2x2
    max pool), a ReLU dense layer, softmax. Widths null: chosen from the input size
    (28x28: channels [32, 64], dense 512; below 15 pixels a side, e.g. 8x8: [16, 32], 64)."""
    kind: Literal["cnn"] = "cnn"
    num_classes: int = field(default=10, metadata=_check(lambda v: v >= 2, "an integer >= 2"))
    channels: Union[tuple[int, ...], None] = field(default=None, metadata=_check(
        lambda v: v is None or (len(v) == 2 and all(c > 0 for c in v)),
        "null or a list of two positive integers"))
    dense: Union[int, None] = field(default=None, metadata=_check(
        lambda v: v is None or v > 0, "null or a positive integer"))


@dataclass(frozen=True)
class MatrixFactorizationModel:
    """Biased MF (Koren et al. 2009): r = mu + b_u + b_i + p_u . q_i; p_u, b_u private."""
    kind: Literal["matrix_factorization"] = "matrix_factorization"
    dim: int = field(default=32, metadata=_POS_INT)
    l2: float = field(default=0.02, metadata=_NONNEG)
    init_scale: float = field(default=0.1, metadata=_POS)
    # mse: explicit ratings (Koren et al.); bce: implicit feedback -- every rated item is a
    # positive, train_negatives unrated items per positive (drawn once per run) are
    # negatives, binary cross-entropy on the score (evaluated by ranking: eval.ranking)
    objective: Literal["mse", "bce"] = "mse"
    train_negatives: int = field(default=4, metadata=_POS_INT)


ModelConfig = Union[LogisticRegressionModel, MultinomialLogisticRegressionModel,
                    MLPModel, CNNModel, MatrixFactorizationModel]
MODEL_KINDS = {c.__dataclass_fields__["kind"].default: c
               for c in (LogisticRegressionModel, MultinomialLogisticRegressionModel,
                         MLPModel, CNNModel, MatrixFactorizationModel)}


# ------------------------------------------------------------------------ algorithm

@dataclass(frozen=True)
class OptimizerConfig:
    """``name`` = an optax optimizer (``optax.<name>``); ``kwargs`` = its arguments."""
    name: str
    kwargs: dict


ALGORITHMS = ("fedavg", "fedsgd", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox",
              "scaffold", "fednova", "ditto", "fcf", "fedrecon", "centralized", "local_only")
# centralized (all ratings pooled) and local_only (every user alone): the non-federated
# upper and lower references of a recommender, on the same model, data and round loop
RECOMMENDATION_ALGORITHMS = ("fcf", "fedrecon", "centralized", "local_only")
RECOMMENDATION_BASELINES = ("centralized", "local_only")

# FedOpt family: FedAvg with this server optimizer (Hsu et al. 2019; Reddi et al. 2021).
# Defaults follow Reddi et al.'s search grids' typical values; tau = eps = 1e-3.
SERVER_OPTIMIZER_OF = {
    "fedavgm": OptimizerConfig("sgd", {"learning_rate": 1.0, "momentum": 0.9}),
    "fedadam": OptimizerConfig("adam", {"learning_rate": 0.01, "b1": 0.9, "b2": 0.99,
                                        "eps": 0.001}),
    "fedyogi": OptimizerConfig("yogi", {"learning_rate": 0.01, "b1": 0.9, "b2": 0.99,
                                        "eps": 0.001}),
    # Reddi et al.'s FedAdagrad divides by sqrt(v_t) + tau from v_-1 = tau^2; optax's
    # adagrad by sqrt(v_t + eps) from v_0 = initial_accumulator_value (default 0.1: an
    # effective tau of ~0.3). v_0 = tau^2, eps = 3 tau^2 is within 16% of the paper's
    # denominator for every v_t >= tau^2
    "fedadagrad": OptimizerConfig("adagrad", {"learning_rate": 0.01,
                                              "initial_accumulator_value": 1e-6, "eps": 3e-6}),
}
# keys that only some algorithms take (absent = the algorithm's default)
ALGORITHM_ONLY_KEYS = {"mu": ("fedprox",), "straggler_fraction": ("fedprox",),
                       "drop_stragglers": ("fedprox",), "lam": ("ditto",),
                       "personal_epochs": ("ditto",),
                       "item_aggregation": ("fcf", "fedrecon"), "recon_steps": ("fedrecon",),
                       "support_fraction": ("fedrecon",)}
# keys that only some sampling kinds take
SAMPLING_ONLY_KEYS = {"max_cohort_size": ("poisson",)}


SAMPLINGS = ("fixed", "poisson", "epochs")


@dataclass(frozen=True)
class AlgorithmConfig:
    name: Literal[ALGORITHMS] = "fedavg"
    # fixed: clients_per_round clients uniformly without replacement; poisson: each client
    # independently with rate clients_per_round / K (cohort padded to max_cohort_size,
    # default: the size exceeded with probability <= 1e-12 per round); epochs: each client
    # once per epoch of ceil(K / clients_per_round) rounds
    sampling: Literal[SAMPLINGS] = "fixed"
    max_cohort_size: Union[int, None] = None                    # poisson only
    clients_per_round: int = field(default=10, metadata=_POS_INT)
    local_epochs: int = field(default=1, metadata=_POS_INT)
    batch_size: int = field(default=16, metadata=_POS_INT)
    weighting: Literal["examples", "uniform"] = "examples"
    client_optimizer: OptimizerConfig = OptimizerConfig("sgd", {"learning_rate": 0.1})
    server_optimizer: OptimizerConfig = OptimizerConfig("sgd", {"learning_rate": 1.0})
    mu: float = field(default=0.01, metadata=_NONNEG)         # fedprox: proximal weight
    straggler_fraction: float = field(default=0.0, metadata=_check(
        lambda v: 0 <= v <= 1, "a number in [0, 1]"))          # fedprox
    drop_stragglers: bool = False                               # fedprox
    # ditto: the pull lam of each personal model to the global one, and the epochs E_p of
    # its update (null: local_epochs)
    lam: float = field(default=0.1, metadata=_NONNEG)
    personal_epochs: Union[int, None] = field(default=None, metadata=_check(
        lambda v: v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 1),
        "null or an integer >= 1"))
    # fcf: an item's delta is the mean over the users who rated it ('raters') or the sum
    # over all reporting users' weights ('all'; the one DP uses, with a fixed denominator)
    item_aggregation: Literal["raters", "all"] = "raters"
    # fedrecon: epochs reconstructing the private user parameters on the support split
    # (a support_fraction of each user's ratings) before the global update on the rest
    recon_steps: int = field(default=1, metadata=_POS_INT)
    support_fraction: float = field(default=0.5, metadata=_check(lambda v: 0 < v < 1,
                                                                 "a number in (0, 1)"))


AGGREGATORS = ("mean", "median", "trimmed_mean", "krum", "multi_krum", "geometric_median",
               "norm_bound", "dp_gaussian", "dp_ftrl", "secure_mean", "dp_secure_mean")
# aggregators whose release is a DP mechanism accounted in fedjax_lite.privacy.accounting
DP_AGGREGATORS = ("dp_gaussian", "dp_ftrl", "dp_secure_mean")
_DP = DP_AGGREGATORS
AGGREGATOR_KEYS = {"trim": ("trimmed_mean",), "num_byzantine": ("krum", "multi_krum"),
                   "num_selected": ("multi_krum",), "max_norm": ("norm_bound",),
                   "max_iters": ("geometric_median",), "clip_norm": _DP,
                   "noise_multiplier": _DP, "denominator": _DP,
                   "target_quantile": ("dp_gaussian",), "clip_learning_rate": ("dp_gaussian",),
                   "count_stddev": ("dp_gaussian",), "restart_every": ("dp_ftrl",),
                   "clip_value": ("secure_mean",), "bits": ("secure_mean", "dp_secure_mean"),
                   "min_survivors": ("secure_mean", "dp_secure_mean"),
                   "neighbors": ("secure_mean", "dp_secure_mean")}


@dataclass(frozen=True)
class AggregatorConfig:
    name: Literal[AGGREGATORS] = "mean"
    trim: float = field(default=0.1, metadata=_check(lambda v: 0 <= v < 0.5,
                                                     "a number in [0, 0.5)"))
    num_byzantine: int = field(default=1, metadata=_NONNEG_INT)
    num_selected: int = field(default=2, metadata=_POS_INT)
    max_norm: float = field(default=1.0, metadata=_POS)
    max_iters: int = field(default=10, metadata=_POS_INT)
    # DP aggregators: clip every update to L2 norm clip_norm (the initial norm with
    # adaptive clipping), Gaussian noise of std noise_multiplier * clip_norm on the sum
    # (null: 1.0, or calibrated to privacy.target_epsilon), divided by a fixed denominator:
    # 'expected' = clients_per_round, 'expected_reporting' = clients_per_round * (1 -
    # clients.dropout) (unbiased under dropout)
    clip_norm: float = field(default=1.0, metadata=_POS)
    noise_multiplier: Union[float, None] = field(default=None, metadata=_check(
        lambda v: v is None or v >= 0, "a number >= 0"))
    denominator: Literal["expected", "expected_reporting"] = "expected"
    # dp_gaussian adaptive clipping (Andrew et al. 2021): on when target_quantile is set
    target_quantile: Union[float, None] = field(default=None, metadata=_check(
        lambda v: v is None or 0 < v < 1, "a number in (0, 1)"))
    clip_learning_rate: float = field(default=0.2, metadata=_POS)
    count_stddev: Union[float, None] = field(default=None, metadata=_check(
        lambda v: v is None or v > 0, "a number > 0"))
    # dp_ftrl: rounds per tree (null: one tree for the run, or one epoch with sampling epochs)
    restart_every: Union[int, None] = field(default=None, metadata=_check(
        lambda v: v is None or v > 0, "a positive integer"))
    # secure_mean (secure aggregation simulated): per-coordinate clip, fixed-point bits;
    # the round aborts below min_survivors (null: a majority of clients_per_round);
    # neighbors: null = all pairs (SecAgg), k = a k-regular graph (SecAgg+)
    clip_value: float = field(default=1.0, metadata=_POS)
    bits: int = field(default=16, metadata=_check(lambda v: 2 <= v <= 24,
                                                  "an integer in [2, 24]"))
    min_survivors: Union[int, None] = field(default=None, metadata=_check(
        lambda v: v is None or v >= 1, "a positive integer"))
    neighbors: Union[int, None] = field(default=None, metadata=_check(
        lambda v: v is None or (v >= 2 and v % 2 == 0), "an even integer >= 2"))


@dataclass(frozen=True)
class PrivacyConfig:
    """Accounting of the DP aggregators (``fedjax_lite.privacy.accounting``).

    neighboring: null = the sampling's natural relation (poisson: add_remove, fixed:
    replace_one, epochs and dp_ftrl otherwise: zero_out). target_epsilon: calibrate
    aggregator.noise_multiplier to it (when that is null), or refuse a config that would
    exceed it. nonprivate_diagnostics: also log round metrics computed from client data
    outside the mechanism (train_loss, exact clipped fraction, cohort size, round times);
    off by default. secure_mode: draw the randomness of sampling, training and noise from
    the OS instead of the seed.
    """
    accountant: Literal["rdp", "pld"] = "rdp"
    neighboring: Union[Literal["add_remove", "zero_out", "replace_one"], None] = None
    delta: float = field(default=1e-5, metadata=_check(lambda v: 0 < v < 1,
                                                       "a number in (0, 1)"))
    target_epsilon: Union[float, None] = field(default=None, metadata=_check(
        lambda v: v is None or v > 0, "a number > 0"))
    nonprivate_diagnostics: bool = False
    # false: sampling, training and DP noise keys come from the seed (reproducible; the
    # run folder is then a simulation record: whoever knows the seed can subtract the
    # noise). true: they come from the OS's entropy, kept only in OUT/checkpoints
    secure_mode: bool = False


@dataclass(frozen=True)
class ClientsConfig:
    dropout: float = field(default=0.0, metadata=_FRACTION)


@dataclass(frozen=True)
class AttackConfig:
    """A fixed, seeded ``fraction`` of the population is Byzantine."""
    kind: Literal["none", "sign_flip", "gaussian", "scale", "label_flip"] = "none"
    fraction: float = field(default=0.2, metadata=_check(lambda v: 0 <= v <= 1,
                                                          "a number in [0, 1]"))
    scale: float = field(default=1.0, metadata=_POS)       # sign_flip / scale multiplier
    noise_std: float = field(default=1.0, metadata=_POS)   # gaussian


COMPRESSION_KEYS = {"bits": ("qsgd", "rotated_quantization"), "fraction": ("top_k",),
                    "error_feedback": ("qsgd", "top_k", "rotated_quantization")}


@dataclass(frozen=True)
class CompressionConfig:
    """Uplink compression of client updates (``fedjax_lite.core.compression``).
    error_feedback: each client keeps the part its compressed uploads lost (a residual in
    a population-sized client state) and adds it to its next update."""
    kind: Literal["none", "qsgd", "top_k", "rotated_quantization"] = "none"
    bits: int = field(default=8, metadata=_check(lambda v: 2 <= v <= 16,
                                                 "an integer in [2, 16]"))
    fraction: float = field(default=0.01, metadata=_check(lambda v: 0 < v <= 1,
                                                          "a number in (0, 1]"))
    error_feedback: bool = False


@dataclass(frozen=True)
class EngineConfig:
    """Speed knobs; results do not depend on them beyond float reassociation.

    chunk_size: clients trained together (``auto``: on CPU 64, or 8 when client sizes
    are skewed -- largest > 4x median; the whole cohort on GPU/TPU; ``all``: the whole
    cohort; or an integer). unroll: local step scan unroll. devices: how many local
    devices the cohort is sharded over (``auto``: all; the CLI exposes every CPU core as
    a device). group_by_size: chunks hold clients of similar size (skewed populations
    then skip most padded steps). backend: how the cohort is split over the devices,
    ``shard_map`` or the classic ``pmap`` (same results). micro_cohort: null, or how many
    clients' updates exist at once: the FedAvg family with a linear aggregator (mean,
    norm_bound, dp_gaussian, dp_ftrl) then runs the cohort in micro-cohorts of that
    many clients with a running weighted sum (same result to float tolerance).
    compile_rounds: K rounds run as one compiled program (a ``lax.scan``; no host round
    trip between them), wherever K rounds fit before the next evaluation or checkpoint;
    the same states and metrics as K separate rounds. population: see below.
    """
    chunk_size: Union[int, Literal["auto", "all"]] = "auto"
    unroll: int = field(default=4, metadata=_POS_INT)
    devices: Union[int, Literal["auto"]] = "auto"
    group_by_size: bool = True
    backend: Literal["shard_map", "pmap"] = "shard_map"
    micro_cohort: Union[int, None] = field(
        default=None, metadata=_check(lambda v: v is None or v > 0,
                                      "a positive integer or null"))
    compile_rounds: int = field(default=1, metadata=_POS_INT)
    # with several devices: the device-resident population split over them by rows
    # ('sharded': each device holds 1/D of it; the rows a chunk needs are fetched from
    # where they live, results identical) or a copy on each ('replicated'); auto: sharded
    # when the population exceeds 64 MiB (classification models, shard_map backend)
    population: Literal["auto", "replicated", "sharded"] = "auto"


@dataclass(frozen=True)
class EvalConfig:
    """What each evaluation row measures besides the model's loss.

    ranking (recommenders): HR@10 / NDCG@10 of each held-out item among ``negatives``
    items the user never rated (sampled once per run; He et al. 2017) and among all of
    them (Krichene and Rendle 2020): eval_hr10, eval_ndcg10, eval_hr10_full,
    eval_ndcg10_full. train: also evaluate the global model on the training population
    (eval_train_loss, eval_train_accuracy: the federated objective f(w) = sum_k p_k F_k(w)
    that FL papers plot as "training loss", p_k by example counts); not in a DP run
    without privacy.nonprivate_diagnostics (it is computed from client data)."""
    ranking: bool = False
    negatives: int = field(default=99, metadata=_POS_INT)
    train: bool = False


@dataclass(frozen=True)
class Config:
    seed: int = field(default=0, metadata=_SEED)
    rounds: int = field(default=100, metadata=_POS_INT)
    eval_every: int = field(default=5, metadata=_POS_INT)
    checkpoint_every: int = field(default=10, metadata=_NONNEG_INT)  # 0: only at the end
    data: DataConfig = field(default_factory=SyntheticLogisticData)
    model: ModelConfig = field(default_factory=LogisticRegressionModel)
    algorithm: AlgorithmConfig = field(default_factory=AlgorithmConfig)
    aggregator: AggregatorConfig = field(default_factory=AggregatorConfig)
    clients: ClientsConfig = field(default_factory=ClientsConfig)
    attack: AttackConfig = field(default_factory=AttackConfig)
    compression: CompressionConfig = field(default_factory=CompressionConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    @property
    def is_private(self) -> bool:
        """A DP aggregator: epsilon is accounted and reported."""
        return self.aggregator.name in DP_AGGREGATORS

    @property
    def data_seed(self) -> int:
        """The data's seed (generation, splits, sampled negatives): ``data.seed`` where
        the data kind has one and it is set, else the run's ``seed``."""
        seed = getattr(self.data, "seed", None)
        return self.seed if seed is None else seed

    @property
    def num_classes(self) -> int:
        return getattr(self.model, "num_classes", 2)
