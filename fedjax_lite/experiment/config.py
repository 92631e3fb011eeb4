"""Typed experiment configuration, validated once at the boundary.

A YAML file (read with ``yaml.safe_load``) plus ``--set key.path=value`` overrides is
turned into frozen dataclasses; anything wrong -- an unknown key, a wrong type, a value
out of range, an unknown optimizer, model or data kind -- raises :class:`ConfigError`
with a one-line message that names the key and what is allowed. Nothing downstream
reads raw dicts.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import re
import types
import typing
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import yaml


class ConfigError(ValueError):
    """A bad configuration; the message names the offending key."""


def _check(pred, allowed: str) -> dict:
    return {"check": (pred, allowed)}


_POS_INT = _check(lambda v: v > 0, "a positive integer")
_NONNEG_INT = _check(lambda v: v >= 0, "an integer >= 0")
_POS = _check(lambda v: v > 0, "a number > 0")
_NONNEG = _check(lambda v: v >= 0, "a number >= 0")
_FRACTION = _check(lambda v: 0 <= v < 1, "a number in [0, 1)")


# ----------------------------------------------------------------------------- data

@dataclass(frozen=True)
class SyntheticLogisticData:
    """Binary clients sharing one linear boundary, with feature shift and size skew."""
    kind: Literal["synthetic_logistic"] = "synthetic_logistic"
    num_clients: int = field(default=1000, metadata=_POS_INT)
    num_features: int = field(default=20, metadata=_POS_INT)
    mean_examples: float = field(default=50.0, metadata=_POS)
    size_sigma: float = field(default=0.5, metadata=_NONNEG)
    min_examples: int = field(default=4, metadata=_check(lambda v: v >= 2, "an integer >= 2"))
    feature_shift: float = field(default=1.0, metadata=_NONNEG)
    label_noise: float = field(default=0.02, metadata=_check(lambda v: 0 <= v <= 0.5,
                                                            "a number in [0, 0.5]"))
    test_fraction: float = field(default=0.2, metadata=_FRACTION)


@dataclass(frozen=True)
class FedProxSyntheticData:
    """Synthetic(alpha, beta) of Li et al. (MLSys 2020), section 5.1, or its IID variant."""
    kind: Literal["fedprox_synthetic"] = "fedprox_synthetic"
    alpha: float = field(default=1.0, metadata=_NONNEG)
    beta: float = field(default=1.0, metadata=_NONNEG)
    iid: bool = False
    num_clients: int = field(default=30, metadata=_POS_INT)
    num_features: int = field(default=60, metadata=_POS_INT)
    num_classes: int = field(default=10, metadata=_check(lambda v: v >= 2, "an integer >= 2"))
    test_fraction: float = field(default=0.2, metadata=_FRACTION)


@dataclass(frozen=True)
class NpzData:
    """Bring-your-own data: .npz files with arrays x (N, d), y (N,), client (N,)."""
    kind: Literal["npz"] = "npz"
    path: str = ""
    test_path: str | None = None
    test_fraction: float = field(default=0.2, metadata=_FRACTION)


DataConfig = Union[SyntheticLogisticData, FedProxSyntheticData, NpzData]
DATA_KINDS = {c.__dataclass_fields__["kind"].default: c
              for c in (SyntheticLogisticData, FedProxSyntheticData, NpzData)}


# ---------------------------------------------------------------------------- model

@dataclass(frozen=True)
class LogisticRegressionModel:
    kind: Literal["logistic_regression"] = "logistic_regression"


@dataclass(frozen=True)
class MultinomialLogisticRegressionModel:
    kind: Literal["multinomial_logistic_regression"] = "multinomial_logistic_regression"
    num_classes: int = field(default=10, metadata=_check(lambda v: v >= 2, "an integer >= 2"))


ModelConfig = Union[LogisticRegressionModel, MultinomialLogisticRegressionModel]
MODEL_KINDS = {c.__dataclass_fields__["kind"].default: c
               for c in (LogisticRegressionModel, MultinomialLogisticRegressionModel)}


# ------------------------------------------------------------------------ algorithm

@dataclass(frozen=True)
class OptimizerConfig:
    """``name`` = an optax optimizer (``optax.<name>``); ``kwargs`` = its arguments."""
    name: str
    kwargs: dict


ALGORITHMS = ("fedavg", "fedsgd", "fedavgm", "fedadam", "fedyogi", "fedadagrad", "fedprox",
              "scaffold", "fednova")

# FedOpt family: FedAvg with this server optimizer (Hsu et al. 2019; Reddi et al. 2021).
# Defaults follow Reddi et al.'s search grids' typical values; tau = eps = 1e-3.
SERVER_OPTIMIZER_OF = {
    "fedavgm": OptimizerConfig("sgd", {"learning_rate": 1.0, "momentum": 0.9}),
    "fedadam": OptimizerConfig("adam", {"learning_rate": 0.01, "b1": 0.9, "b2": 0.99,
                                        "eps": 0.001}),
    "fedyogi": OptimizerConfig("yogi", {"learning_rate": 0.01, "b1": 0.9, "b2": 0.99,
                                        "eps": 0.001}),
    "fedadagrad": OptimizerConfig("adagrad", {"learning_rate": 0.01, "eps": 0.001}),
}
# keys that only some algorithms take (absent = the algorithm's default)
ALGORITHM_ONLY_KEYS = {"mu": ("fedprox",), "straggler_fraction": ("fedprox",),
                       "drop_stragglers": ("fedprox",)}
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
    outside the mechanism (train_loss, exact clipped fraction, cohort size); off by default.
    """
    accountant: Literal["rdp", "pld"] = "rdp"
    neighboring: Union[Literal["add_remove", "zero_out", "replace_one"], None] = None
    delta: float = field(default=1e-5, metadata=_check(lambda v: 0 < v < 1,
                                                       "a number in (0, 1)"))
    target_epsilon: Union[float, None] = field(default=None, metadata=_check(
        lambda v: v is None or v > 0, "a number > 0"))
    nonprivate_diagnostics: bool = False


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
    then skip most padded steps).
    """
    chunk_size: Union[int, Literal["auto", "all"]] = "auto"
    unroll: int = field(default=4, metadata=_POS_INT)
    devices: Union[int, Literal["auto"]] = "auto"
    group_by_size: bool = True


@dataclass(frozen=True)
class Config:
    seed: int = field(default=0, metadata=_NONNEG_INT)
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

    @property
    def is_private(self) -> bool:
        """A DP aggregator: epsilon is accounted and reported."""
        return self.aggregator.name in DP_AGGREGATORS

    @property
    def num_classes(self) -> int:
        return getattr(self.model, "num_classes", 2)


# ------------------------------------------------------------------------ parsing

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string",
            type(None): "null", dict: "a mapping"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(value: Any, tp, key: str):
    """Returns ``value`` as type ``tp`` or raises ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"config key '{key}': got {value!r}, expected {_describe(tp)}")
    if origin in (Union, types.UnionType):
        for option in typing.get_args(tp):
            try:
                return _coerce(value, option, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key '{key}': got {value!r}, expected {_describe(tp)}")
    if tp is type(None):
        if value is None:
            return None
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and _NUMBER.match(value.strip()) and float(value).is_integer():
            return int(float(value))
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _NUMBER.match(value.strip()):  # YAML reads 1e-3 as str
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif tp is OptimizerConfig:
        return _optimizer(value, key)
    elif dataclasses.is_dataclass(tp):
        return _dataclass(tp, value, key)
    raise ConfigError(f"config key '{key}': got {value!r}, expected {_describe(tp)}")


def _dataclass(cls, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"config key '{prefix or '<root>'}': expected a mapping, "
                          f"got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        where = f"{prefix}.{unknown[0]}" if prefix else unknown[0]
        raise ConfigError(f"unknown config key '{where}'; allowed keys"
                          f"{' under ' + repr(prefix) if prefix else ''}: "
                          f"{', '.join(sorted(fields))}")
    kwargs = {}
    for name, value in raw.items():
        key = f"{prefix}.{name}" if prefix else name
        tp = hints[name]
        if hints[name] is OptimizerConfig and isinstance(value, dict) and "name" not in value:
            default = fields[name].default  # partial override: keep the default optimizer
            value = {"name": default.name, **default.kwargs, **value}
        if name == "data":
            value = _tagged(DATA_KINDS, value, key, "kind")
        elif name == "model":
            value = _tagged(MODEL_KINDS, value, key, "kind")
        else:
            value = _coerce(value, tp, key)
        check = fields[name].metadata.get("check")
        if check and not check[0](value):
            raise ConfigError(f"config key '{key}': got {value!r}, expected {check[1]}")
        kwargs[name] = value
    return cls(**kwargs)


def _tagged(kinds: dict, raw: Any, key: str, tag: str):
    if not isinstance(raw, dict) or tag not in raw:
        raise ConfigError(f"config key '{key}.{tag}' is required; one of "
                          f"{', '.join(sorted(kinds))}")
    if raw[tag] not in kinds:
        raise ConfigError(f"config key '{key}.{tag}': unknown {key} kind {raw[tag]!r}; "
                          f"allowed: {', '.join(sorted(kinds))}")
    return _dataclass(kinds[raw[tag]], raw, key)


def optimizer_names() -> list[str]:
    import optax
    return sorted(n for n in dir(optax) if not n.startswith("_") and n.islower()
                  and callable(getattr(optax, n)) and "learning_rate" in _params(getattr(optax, n)))


def _params(fn) -> dict:
    try:
        return dict(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return {}


def _optimizer(raw: Any, key: str) -> OptimizerConfig:
    import optax
    if not isinstance(raw, dict) or "name" not in raw:
        raise ConfigError(f"config key '{key}': expected a mapping with 'name' (an optax "
                          f"optimizer such as sgd, adam) and its arguments, got {raw!r}")
    name = raw["name"]
    names = optimizer_names()
    if name not in names:
        raise ConfigError(f"config key '{key}.name': unknown optimizer {name!r}; allowed: "
                          f"{', '.join(names)}")
    params = _params(getattr(optax, name))
    kwargs = {}
    for arg, value in raw.items():
        if arg == "name":
            continue
        if arg not in params:
            raise ConfigError(f"config key '{key}.{arg}': optax.{name} has no argument "
                              f"{arg!r}; allowed: {', '.join(params)}")
        if isinstance(value, str) and _NUMBER.match(value.strip()):
            value = float(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and arg in (
                "learning_rate",) and not value > 0:
            raise ConfigError(f"config key '{key}.{arg}': got {value!r}, expected a number > 0")
        kwargs[arg] = value
    missing = [p.name for p in params.values() if p.default is inspect.Parameter.empty
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and p.name not in kwargs]
    if missing:
        raise ConfigError(f"config key '{key}': optax.{name} needs {', '.join(missing)}")
    try:
        getattr(optax, name)(**kwargs)
    except Exception as e:  # noqa: BLE001 -- report any constructor complaint as config
        raise ConfigError(f"config key '{key}': optax.{name}({kwargs}) failed: {e}") from None
    return OptimizerConfig(name, kwargs)


def set_override(raw: dict, assignment: str) -> None:
    """Applies ``key.path=value`` (value parsed as YAML) to the raw config mapping."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key.path=value")
    path, text = assignment.split("=", 1)
    keys = path.strip().split(".")
    if not all(keys):
        raise ConfigError(f"--set {assignment!r}: empty key in {path!r}")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {assignment!r}: value is not valid YAML ({e})") from None
    node = raw
    for i, k in enumerate(keys[:-1]):
        child = node.get(k)
        if child is None:
            child = node[k] = {}
        if not isinstance(child, dict):
            raise ConfigError(f"--set {assignment!r}: '{'.'.join(keys[:i + 1])}' is not a "
                              "mapping")
        node = child
    node[keys[-1]] = value


def load_raw(path: str) -> dict:
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}".replace("\n", " ")) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def _only_for(raw: dict, section: str, name: str, keys: dict, field: str = "name") -> None:
    for key, owners in keys.items():
        if key in raw and name not in owners:
            raise ConfigError(f"config key '{section}.{key}' applies only to "
                              f"{section}.{field} in ({', '.join(owners)}), not {name!r}")


def parse(raw: dict) -> Config:
    """Validates a raw mapping into a :class:`Config` (raises ConfigError)."""
    if isinstance(raw.get("aggregator"), dict) and "delta" in raw["aggregator"]:
        raise ConfigError("config key 'aggregator.delta' has moved to 'privacy.delta'")
    config = _dataclass(Config, raw, "")
    algo_raw = raw.get("algorithm") or {}
    name = config.algorithm.name
    _only_for(algo_raw, "algorithm", name, ALGORITHM_ONLY_KEYS)
    _only_for(raw.get("aggregator") or {}, "aggregator", config.aggregator.name,
              AGGREGATOR_KEYS)
    _only_for(raw.get("compression") or {}, "compression", config.compression.kind,
              COMPRESSION_KEYS, field="kind")
    if name in SERVER_OPTIMIZER_OF:
        expected = SERVER_OPTIMIZER_OF[name]
        given = algo_raw.get("server_optimizer")
        if given is None:
            config = dataclasses.replace(config, algorithm=dataclasses.replace(
                config.algorithm, server_optimizer=expected))
        elif config.algorithm.server_optimizer.name != expected.name:
            raise ConfigError(f"config key 'algorithm.server_optimizer.name': {name} uses "
                              f"{expected.name!r}, got "
                              f"{config.algorithm.server_optimizer.name!r} (or use fedavg)")
        else:  # the algorithm's defaults for what the user left out (e.g. momentum, tau)
            given_opt = config.algorithm.server_optimizer
            merged = OptimizerConfig(expected.name, {**expected.kwargs, **given_opt.kwargs})
            config = dataclasses.replace(config, algorithm=dataclasses.replace(
                config.algorithm, server_optimizer=merged))
    _only_for(algo_raw, "algorithm", config.algorithm.sampling, SAMPLING_ONLY_KEYS,
              field="sampling")
    agg = config.aggregator
    if agg.name in DP_AGGREGATORS + ("secure_mean",) and config.algorithm.weighting != "uniform":
        raise ConfigError(f"config key 'algorithm.weighting': aggregator {agg.name} weights "
                          "every client equally (bounded sensitivity / only the sum is "
                          "revealed); set algorithm.weighting: uniform")
    if config.is_private:
        _check_private(config, raw)
    elif "privacy" in raw:
        raise ConfigError(f"config key 'privacy' applies only to the DP aggregators "
                          f"({', '.join(DP_AGGREGATORS)}), not aggregator {agg.name!r}")
    if config.algorithm.max_cohort_size is not None and (
            config.algorithm.max_cohort_size < config.algorithm.clients_per_round):
        raise ConfigError(f"config key 'algorithm.max_cohort_size': "
                          f"{config.algorithm.max_cohort_size} is below clients_per_round="
                          f"{config.algorithm.clients_per_round}")
    if name in ("scaffold", "fednova") and config.algorithm.client_optimizer.name != "sgd":
        raise ConfigError(f"config key 'algorithm.client_optimizer.name': {name} is defined "
                          f"for plain client SGD, got "
                          f"{config.algorithm.client_optimizer.name!r}")
    if config.model.kind == "logistic_regression" and getattr(config.data, "num_classes", 2) != 2:
        raise ConfigError("config key 'model.kind': logistic_regression is binary but "
                          f"data.num_classes={config.data.num_classes}; use "
                          "multinomial_logistic_regression")
    if (config.model.kind == "multinomial_logistic_regression"
            and hasattr(config.data, "num_classes")
            and config.data.num_classes != config.model.num_classes):
        raise ConfigError(f"config key 'model.num_classes': {config.model.num_classes} differs "
                          f"from data.num_classes={config.data.num_classes}")
    if isinstance(config.data, NpzData) and not config.data.path:
        raise ConfigError("config key 'data.path' is required for data kind 'npz'")
    if isinstance(config.engine.devices, int) and config.engine.devices <= 0:
        raise ConfigError(f"config key 'engine.devices': got {config.engine.devices}, "
                          "expected a positive integer or 'auto'")
    if isinstance(config.engine.chunk_size, int) and config.engine.chunk_size <= 0:
        raise ConfigError(f"config key 'engine.chunk_size': got {config.engine.chunk_size}, "
                          "expected a positive integer, 'auto' or 'all'")
    return config


# Algorithms whose server update uses client data outside the aggregator, so a DP
# aggregator would not cover it (issue: SCAFFOLD's server control variate is the plain mean
# of the clients' control-variate updates; FedNova rescales the noised update by tau_eff,
# a function of the cohort's exact example counts).
NOT_PRIVATE_WITH_DP = {
    "scaffold": "its server control variate is updated from the clients' unclipped, "
                "un-noised control variates",
    "fednova": "its update is rescaled by tau_eff, computed from the cohort's exact "
               "example counts outside the mechanism",
}


def _check_private(config: Config, raw: dict) -> None:
    """A DP aggregator's config must be accountable and leak nothing outside the mechanism."""
    from fedjax_lite.privacy import accounting
    agg, algo, privacy = config.aggregator, config.algorithm, config.privacy
    if algo.name in NOT_PRIVATE_WITH_DP:
        raise ConfigError(f"config key 'algorithm.name': {algo.name} cannot be combined with "
                          f"aggregator {agg.name}: {NOT_PRIVATE_WITH_DP[algo.name]}; use "
                          "fedavg, fedprox, fedsgd or a FedOpt variant")
    mechanism = "ftrl" if agg.name == "dp_ftrl" else "gaussian"
    if privacy.neighboring == "add_remove" and algo.sampling != "poisson" and (
            mechanism == "gaussian" or algo.sampling == "epochs"):
        why = ("adding a client pushes another out of a full cohort, so the sum moves by "
               "2S" if algo.sampling == "fixed" else "adding a client reshuffles every "
               "client's schedule")
        raise ConfigError(f"config key 'privacy.neighboring': add_remove is not valid with "
                          f"algorithm.sampling {algo.sampling} ({why}); use sampling: "
                          "poisson, or neighboring: replace_one")
    if agg.name == "dp_secure_mean" and algo.sampling == "poisson":
        raise ConfigError("config key 'algorithm.sampling': dp_secure_mean aborts a round "
                          "below aggregator.min_survivors, and with Poisson sampling whether "
                          "that happens depends on the cohort size, a count of clients that "
                          "the accounting does not cover; use sampling: fixed or epochs")
    population = max(getattr(config.data, "num_clients", 0), algo.clients_per_round + 1)
    setup = privacy_setup(config, population, noise_multiplier=1.0)
    try:
        accounting.check(setup)
    except accounting.AccountingError as e:
        raise ConfigError(f"config key 'privacy': {e}") from None
    if agg.target_quantile is not None and agg.name != "dp_gaussian":  # pragma: no cover
        raise ConfigError("config key 'aggregator.target_quantile' applies to dp_gaussian")


def privacy_setup(config: Config, population: int, noise_multiplier: float | None = None):
    """The :class:`fedjax_lite.privacy.accounting.PrivacySetup` of a DP run."""
    from fedjax_lite.privacy import accounting
    agg, algo, privacy = config.aggregator, config.algorithm, config.privacy
    mechanism = "ftrl" if agg.name == "dp_ftrl" else "gaussian"
    z = agg.noise_multiplier if noise_multiplier is None else noise_multiplier
    restart = agg.restart_every
    if mechanism == "ftrl" and restart is None and algo.sampling == "epochs":
        restart = -(-population // algo.clients_per_round)
    return accounting.PrivacySetup(
        noise_multiplier=1.0 if z is None else float(z), population=int(population),
        cohort_size=algo.clients_per_round, sampling=algo.sampling,
        neighboring=privacy.neighboring or accounting.default_neighboring(algo.sampling,
                                                                          mechanism),
        accountant=privacy.accountant, mechanism=mechanism, restart_every=restart)


def load(path: str, overrides: list[str] = ()) -> Config:
    raw = load_raw(path)
    for assignment in overrides:
        set_override(raw, assignment)
    return parse(raw)


def to_dict(config: Config) -> dict:
    """The resolved config as plain data (what ``config.yaml`` holds); parses back to
    an equal Config."""
    rules = {AlgorithmConfig: ((ALGORITHM_ONLY_KEYS, "name"), (SAMPLING_ONLY_KEYS, "sampling")),
             AggregatorConfig: ((AGGREGATOR_KEYS, "name"),),
             CompressionConfig: ((COMPRESSION_KEYS, "kind"),)}

    def applies(obj, name: str) -> bool:
        return all(name not in only or getattr(obj, by) in only[name]
                   for only, by in rules.get(type(obj), ()))

    def convert(obj):
        if isinstance(obj, OptimizerConfig):
            return {"name": obj.name, **obj.kwargs}
        if dataclasses.is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                    if applies(obj, f.name)
                    and not (f.name == "privacy" and not config.is_private)}
        return obj
    return convert(config)
