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
import re
import types
import typing
from typing import Any, Literal, Union

import yaml

from fedjax_lite.experiment.config_schema import *  # noqa: F401,F403 -- the public schema
from fedjax_lite.experiment.config_schema import (AGGREGATOR_KEYS, ALGORITHM_ONLY_KEYS,
                                                  COMPRESSION_KEYS, DATA_KINDS,
                                                  DP_AGGREGATORS, MODEL_KINDS,
                                                  SAMPLING_ONLY_KEYS, SERVER_OPTIMIZER_OF,
                                                  AggregatorConfig, AlgorithmConfig,
                                                  CompressionConfig, Config, ConfigError,
                                                  NpzData, OptimizerConfig,
                                                  RATINGS_DATA, RECOMMENDATION_ALGORITHMS,
                                                  RECOMMENDATION_BASELINES)
from fedjax_lite.experiment.config_schema import (PARTITION_KEYS, LeafData, PartitionConfig,
                                                  SklearnDigitsData)


# ------------------------------------------------------------------------ parsing

_NUMBER = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _describe(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_describe(a) for a in typing.get_args(tp))
    if origin is tuple:                       # tuple[T, ...]: a YAML list
        item = typing.get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers"}.get(item, _describe(item))
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
    if origin is tuple:                       # tuple[T, ...] <- a YAML list of T
        if isinstance(value, (list, tuple)):
            try:
                return tuple(_coerce(v, typing.get_args(tp)[0], key) for v in value)
            except ConfigError:
                pass
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
            shown = list(value) if isinstance(value, tuple) else value   # as YAML wrote it
            raise ConfigError(f"config key '{key}': got {shown!r}, expected {check[1]}")
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


# Ranges of the optax arguments whose nonsense values optax accepts silently.
_OPTIMIZER_RANGES = {
    "learning_rate": (lambda v: v > 0, "a number > 0"),
    "momentum": (lambda v: v >= 0, "a number >= 0"),
    "eps": (lambda v: v >= 0, "a number >= 0"),
    "weight_decay": (lambda v: v >= 0, "a number >= 0"),
    "b1": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "b2": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
    "decay": (lambda v: 0 <= v < 1, "a number in [0, 1)"),
}


def _check_optimizer_value(key: str, arg: str, value: Any, param) -> None:
    """An optax argument that is numeric (learning_rate, or a number by default) must be a
    number in its range; a boolean one a boolean (optax builds the optimizer lazily, so a
    string fails only later, deep inside the compiled round)."""
    default = param.default
    numeric = arg in _OPTIMIZER_RANGES or (isinstance(default, (int, float))
                                           and not isinstance(default, bool))
    if isinstance(default, bool) and not isinstance(value, bool):
        raise ConfigError(f"config key '{key}': got {value!r}, expected true or false")
    if numeric:
        if value is None and (default is None or arg == "momentum"):
            return
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"config key '{key}': got {value!r}, expected a number")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and arg in \
            _OPTIMIZER_RANGES and not _OPTIMIZER_RANGES[arg][0](value):
        raise ConfigError(f"config key '{key}': got {value!r}, expected "
                          f"{_OPTIMIZER_RANGES[arg][1]}")


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
        _check_optimizer_value(f"{key}.{arg}", arg, value, params[arg])
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
    """The raw mapping of the YAML config file at ``path`` (ConfigError naming the file)."""
    from fedjax_lite.experiment.config_checks import read_config_file
    return read_config_file(path)


def _only_for(raw: dict, section: str, name: str, keys: dict, field: str = "name") -> None:
    for key, owners in keys.items():
        if key in raw and name not in owners:
            raise ConfigError(f"config key '{section}.{key}' applies only to "
                              f"{section}.{field} in ({', '.join(owners)}), not {name!r}")


def parse(raw: dict) -> Config:
    """Validates a raw mapping into a :class:`Config` (raises ConfigError)."""
    if isinstance(raw.get("aggregator"), dict) and "delta" in raw["aggregator"]:
        raise ConfigError("config key 'aggregator.delta' has moved to 'privacy.delta'")
    from fedjax_lite.experiment.config_checks import check_key_types
    check_key_types(raw)
    config = _dataclass(Config, raw, "")
    algo_raw = raw.get("algorithm") or {}
    name = config.algorithm.name
    _only_for(algo_raw, "algorithm", name, ALGORITHM_ONLY_KEYS)
    _only_for(raw.get("aggregator") or {}, "aggregator", config.aggregator.name,
              AGGREGATOR_KEYS)
    _only_for(raw.get("compression") or {}, "compression", config.compression.kind,
              COMPRESSION_KEYS, field="kind")
    if name in RECOMMENDATION_BASELINES and config.aggregator.name != "mean":
        raise ConfigError(f"config key 'aggregator.name': {name} is a non-federated "
                          "reference and aggregates nothing; leave the aggregator at mean "
                          f"(got {config.aggregator.name!r})")
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
    if agg.name in ("secure_mean", "dp_secure_mean") and agg.min_survivors == 1:
        raise ConfigError("config key 'aggregator.min_survivors': 1 lets the server read a "
                          "lone survivor's update; use at least 2")
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
    if name == "ditto":
        _check_personal(config)
    if config.model.kind == "logistic_regression" and getattr(config.data, "num_classes", 2) != 2:
        raise ConfigError("config key 'model.kind': logistic_regression is binary but "
                          f"data.num_classes={config.data.num_classes}; use "
                          "multinomial_logistic_regression")
    if (hasattr(config.model, "num_classes")      # the softmax models
            and hasattr(config.data, "num_classes")
            and config.data.num_classes != config.model.num_classes):
        raise ConfigError(f"config key 'model.num_classes': {config.model.num_classes} differs "
                          f"from data.num_classes={config.data.num_classes}")
    _check_recommendation(config)
    if isinstance(config.data, NpzData) and not config.data.path:
        raise ConfigError("config key 'data.path' is required for data kind 'npz'")
    _check_example_data(config, raw)
    if isinstance(config.engine.devices, int) and config.engine.devices <= 0:
        raise ConfigError(f"config key 'engine.devices': got {config.engine.devices}, "
                          "expected a positive integer or 'auto'")
    if isinstance(config.engine.chunk_size, int) and config.engine.chunk_size <= 0:
        raise ConfigError(f"config key 'engine.chunk_size': got {config.engine.chunk_size}, "
                          "expected a positive integer, 'auto' or 'all'")
    from fedjax_lite.experiment.config_checks import check_engine
    check_engine(config)
    return config


def _check_example_data(config: Config, raw: dict) -> None:
    """The leaf and sklearn_digits data kinds: required keys, partition keys that apply
    to the chosen partition only, and a model whose classes cover the digits."""
    d = config.data
    if isinstance(d, LeafData) and not d.path:
        raise ConfigError("config key 'data.path' is required for data kind 'leaf' (a LEAF "
                          "JSON file or a directory of them)")
    if not isinstance(d, SklearnDigitsData):
        return
    _only_for((raw.get("data") or {}).get("partition") or {}, "data.partition",
              d.partition.kind, PARTITION_KEYS, field="kind")
    if config.model.kind == "logistic_regression":
        raise ConfigError("config key 'model.kind': logistic_regression is binary but "
                          "sklearn_digits has 10 classes; use multinomial_logistic_regression "
                          "with num_classes: 10")
    if config.num_classes < 10:
        raise ConfigError(f"config key 'model.num_classes': got {config.num_classes}, but "
                          "sklearn_digits has 10 classes (labels 0-9); use 10")


def _check_recommendation(config: Config) -> None:
    """Ratings data, the MF model and the recommendation algorithms go together."""
    ratings = config.data.kind in RATINGS_DATA
    mf = config.model.kind == "matrix_factorization"
    rec = config.algorithm.name in RECOMMENDATION_ALGORITHMS
    if ratings != mf or mf != rec:
        raise ConfigError(
            "config keys 'data.kind', 'model.kind', 'algorithm.name': ratings data "
            f"({', '.join(RATINGS_DATA)}), model matrix_factorization and algorithm "
            f"{' / '.join(RECOMMENDATION_ALGORITHMS)} go together; got data "
            f"{config.data.kind!r}, model {config.model.kind!r}, algorithm "
            f"{config.algorithm.name!r}")
    if rec and config.eval.train:
        raise ConfigError("config key 'eval.train': the recommenders report their own "
                          "metrics (eval_rmse, ranking); eval.train is for classification")
    if not rec:
        if config.eval.ranking:
            raise ConfigError("config key 'eval.ranking': ranking metrics are defined for "
                              "the recommenders (ratings data), not "
                              f"{config.algorithm.name!r}")
        return
    if config.model.objective == "bce" and not config.eval.ranking:
        raise ConfigError("config key 'model.objective': bce (implicit feedback) is "
                          "evaluated by ranking; set eval.ranking: true")
    if config.data.kind == "movielens" and not config.data.path:
        raise ConfigError("config key 'data.path' is required for data kind 'movielens' (a "
                          "directory as GroupLens distributes it, e.g. ml-100k/)")
    agg = config.aggregator.name
    if agg not in ("mean", "dp_gaussian"):
        raise ConfigError(f"config key 'aggregator.name': {config.algorithm.name} sends "
                          f"sparse item updates; it takes mean or dp_gaussian, not {agg!r}")
    if config.attack.kind != "none" or config.compression.kind != "none":
        raise ConfigError(f"config keys 'attack', 'compression': not defined for the sparse "
                          f"item updates of {config.algorithm.name}")
    if agg == "dp_gaussian":
        if config.aggregator.target_quantile is not None:
            raise ConfigError("config key 'aggregator.target_quantile': adaptive clipping is "
                              "not available for sparse updates yet")
        if config.algorithm.item_aggregation != "all":
            raise ConfigError("config key 'algorithm.item_aggregation': dp_gaussian divides "
                              "by a fixed denominator (how many users rated an item is "
                              "client data); set item_aggregation: all")
        if not config.privacy.nonprivate_diagnostics:
            raise ConfigError(
                "config key 'privacy.nonprivate_diagnostics': the RMSE of a recommender is "
                "measured on the users' own held-out ratings with their private factors, "
                "outside the accounted mechanism; set it to true to run (the summary then "
                "says the metrics are non-private diagnostics)")


def _check_personal(config: Config) -> None:
    """Ditto evaluates client k's personal model on client k's own test examples: the test
    population must hold the training clients, row by row."""
    d = config.data
    split = getattr(d, "test_split", None)
    if getattr(d, "test_path", None) or split == "examples" or (
            split == "auto" and not config.is_private):
        return
    why = (f"data.test_split is {split!r} (test clients of its own)" if split is not None
           else f"data kind {d.kind!r} holds out its own test clients")
    raise ConfigError(f"config key 'algorithm.name': ditto evaluates each training "
                      f"client's personal model on that client's own held-out examples, "
                      f"but {why}; use data.test_split: examples (synthetic, npz, leaf and "
                      f"sklearn_digits data)")


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
    if algo.name == "ditto" and not privacy.nonprivate_diagnostics:
        raise ConfigError("config key 'algorithm.name': ditto's personal models are trained "
                          "on each client's data outside the DP mechanism (only the global "
                          "update goes through it), so their evaluation is a non-private "
                          "diagnostic; set privacy.nonprivate_diagnostics: true to run")
    if config.eval.train and not privacy.nonprivate_diagnostics:
        raise ConfigError("config key 'eval.train': the loss on the training clients is "
                          "computed from their data outside the DP mechanism; set "
                          "privacy.nonprivate_diagnostics: true to log it anyway")
    if getattr(config.data, "test_split", None) == "examples" and not getattr(
            config.data, "test_path", None) and not privacy.nonprivate_diagnostics:
        raise ConfigError("config key 'data.test_split': examples evaluates every training "
                          "client's own held-out examples, which the privacy guarantee does "
                          "not cover; use clients (whole clients held out, the default for "
                          "DP runs) or a separate test file")
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
    if agg.target_quantile is not None and setup.neighboring == "zero_out":
        raise ConfigError("config key 'aggregator.target_quantile': adaptive clipping is "
                          "accounted with a clipped-count sensitivity of 1/2, which holds "
                          "under add_remove and (doubled with the sum's) replace_one, not "
                          "under zero_out (a zeroed client's bit flips the count by 1); set "
                          "privacy.neighboring to add_remove (poisson) or replace_one")

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
             CompressionConfig: ((COMPRESSION_KEYS, "kind"),),
             PartitionConfig: ((PARTITION_KEYS, "kind"),)}

    def applies(obj, name: str) -> bool:
        return all(name not in only or getattr(obj, by) in only[name]
                   for only, by in rules.get(type(obj), ()))

    def convert(obj):
        if isinstance(obj, OptimizerConfig):
            return {"name": obj.name, **obj.kwargs}
        if isinstance(obj, tuple):            # tuple-typed keys (model.hidden): YAML lists
            return [convert(o) for o in obj]
        if dataclasses.is_dataclass(obj):
            return {f.name: convert(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                    if applies(obj, f.name)
                    and not (f.name == "privacy" and not config.is_private)}
        return obj
    return convert(config)
