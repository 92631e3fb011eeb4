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
                                                  RECOMMENDATION_BASELINES)
from fedjax_lite.experiment.config_schema import PARTITION_KEYS, PartitionConfig
# the cross-field rules parse() applies; NOT_PRIVATE_WITH_DP and privacy_setup are
# re-exported (cfg.privacy_setup is how builders and privacy_run call it)
from fedjax_lite.experiment.config_rules import NOT_PRIVATE_WITH_DP  # noqa: F401
from fedjax_lite.experiment.config_rules import privacy_setup  # noqa: F401
from fedjax_lite.experiment.config_rules import (_check_example_data, _check_personal,
                                                 _check_private, _check_recommendation,
                                                 _only_for)


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
