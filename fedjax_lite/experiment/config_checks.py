"""Boundary checks the schema cannot express, run before anything is compiled or written:
reading the config file, the output folder, the host memory a synthetic population needs,
and the robust aggregators' requirements on the static cohort size. Each problem raises
:class:`ConfigError` (or :class:`OutputError`) with a one-line message naming the key,
file or path.
"""

from __future__ import annotations

import functools
import math
import os

import yaml

from fedjax_lite.experiment.config_schema import ConfigError, OutputError

MAX_CONFIG_BYTES = 16 * 2 ** 20


# --------------------------------------------------------------------- config file

def read_config_file(path: str) -> dict:
    """The top-level mapping of the YAML config at ``path`` (``yaml.safe_load``)."""
    if not os.path.exists(path):
        raise ConfigError(f"config file not found: {path}")
    if os.path.isdir(path):
        raise ConfigError(f"{path}: is a directory, expected a YAML config file")
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_CONFIG_BYTES + 1)
    except OSError as e:
        raise ConfigError(f"{path}: cannot read the config file ({e.strerror or e})") from None
    if len(data) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: larger than {MAX_CONFIG_BYTES // 2 ** 20} MiB, not a "
                          "config file")
    try:
        if b"\0" in data:
            raise UnicodeDecodeError("utf-8", data, data.index(b"\0"), data.index(b"\0") + 1,
                                     "NUL byte")
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[:e.start].count(b"\n") + 1
        raise ConfigError(f"{path}: not a text (UTF-8) YAML file: binary content at line "
                          f"{line}, byte {e.start}") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {' '.join(str(e).split())}") from None
    except RecursionError:
        raise ConfigError(f"{path}: not valid YAML: nested too deeply") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level, got {type(raw).__name__}")
    return raw


def check_key_types(raw: dict, prefix: str = "") -> None:
    """Every key of the (nested) raw mapping is a string (YAML allows ``1: x``)."""
    for key, value in raw.items():
        where = f"{prefix}.{key}" if prefix else str(key)
        if not isinstance(key, str):
            raise ConfigError(f"config key '{where}': keys must be names (strings), got "
                              f"{type(key).__name__} {key!r}")
        if isinstance(value, dict):
            check_key_types(value, where)


# ---------------------------------------------------------------------- output folder

def check_out_dir(path: str) -> None:
    """``--out`` must be a folder this process can create or write (OutputError)."""
    if not path or not path.strip():
        raise OutputError("--out is empty; name a folder")
    if os.path.lexists(path) and not os.path.exists(path):
        raise OutputError(f"{path} is a broken symbolic link; choose another --out")
    if os.path.exists(path):
        if not os.path.isdir(path):
            raise OutputError(f"{path} is a file, not a folder; choose another --out")
        if not os.access(path, os.W_OK | os.X_OK):
            raise OutputError(f"{path} is not writable by this user; choose another --out")
        return
    probe = os.path.abspath(path)
    while not os.path.lexists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise OutputError(f"cannot create {path}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"cannot create {path}: {probe} is not writable by this user")


# ------------------------------------------------------------------------- memory

def _read_int(path: str) -> int | None:
    try:
        with open(path) as f:
            text = f.read().strip()
        return int(text) if text.isdigit() else None
    except (OSError, ValueError):
        return None


def host_memory() -> tuple[int | None, int | None]:
    """(available, total) bytes of host memory: /proc/meminfo's MemAvailable and
    MemTotal (else sysconf), within a cgroup v2 memory limit; None where unknown."""
    info = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                name, _, rest = line.partition(":")
                if rest.split() and rest.split()[0].isdigit():
                    info[name] = int(rest.split()[0]) * 1024
    except OSError:
        pass
    total, available = info.get("MemTotal"), info.get("MemAvailable")
    if total is None:
        try:
            total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            total = None
    limit = _read_int("/sys/fs/cgroup/memory.max")
    if limit is not None:
        used = _read_int("/sys/fs/cgroup/memory.current") or 0
        total = limit if total is None else min(total, limit)
        room = max(limit - used, 0)
        available = room if available is None else min(available, room)
    return (available if available is not None else total), total


def format_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB", "PB"):
        if n < 1000 or unit == "PB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} PB"  # pragma: no cover


_ARRAY_OVERHEAD = 2 * 112 + 16   # per client while building: two small NumPy arrays + refs


@functools.lru_cache(maxsize=32)
def _padded_width(kind: str, seed: int, num_clients: int, num_features: int,
                  mean_examples: float, size_sigma: float, min_examples: int) -> tuple[int, int]:
    """(largest client, total examples) of the population the generator will draw."""
    from fedjax_lite.data.synthetic import client_sizes
    sizes = client_sizes(kind, seed=seed, num_clients=num_clients, num_features=num_features,
                         mean_examples=mean_examples, size_sigma=size_sigma,
                         min_examples=min_examples)
    return int(sizes.max()), int(sizes.sum())


def population_estimate(config) -> tuple[tuple[str, ...], int, bool, str] | None:
    """(config keys, estimated peak host bytes to build the data, whether that is only a
    lower bound, what was counted) for the synthetic data kinds; None for files."""
    d = config.data
    if d.kind in ("synthetic_logistic", "fedprox_synthetic"):
        K, values = d.num_clients, d.num_features + 1       # float32 features + int32 label
        if d.kind == "synthetic_logistic":
            mean = max(d.mean_examples, d.min_examples)
            params = (d.mean_examples, d.size_sigma, d.min_examples)
        else:
            mean, params = math.exp(6.0) + 50, (50.0, 0.5, 4)   # E[lognormal(4, 2)] + 50
        what = f"{K} clients x ~{mean:.0f} examples x {values} float32 values"
        # the ragged arrays the generator builds, before any padding: a hard lower bound
        lower = K * (mean * values * 4 + _ARRAY_OVERHEAD)
        if lower > (host_memory()[0] or math.inf):   # refused without drawing the sizes
            return ("data.num_clients",), int(lower), True, what
        width, total = _padded_width(d.kind, config.seed, K, d.num_features, *params)
        padded = K * width * values * 4
        # the population padded to its largest client, its train/test split (as large
        # again) and the ragged arrays they are built from
        need = 2 * padded + 2 * total * values * 4 + K * _ARRAY_OVERHEAD
        return (("data.num_clients",), int(need), False,
                f"{K} clients padded to the largest one ({width} examples) x {values} "
                "float32 values, plus the train/test split")
    if d.kind == "synthetic_ratings":
        U, R = d.num_users, d.num_ratings
        cap = min(d.num_items, round(7 * R / U))
        if not U * 20 <= R <= U * cap:
            return None          # the generator refuses it with its own message
        # flat ratings and the generator's temporaries (~64 bytes a rating), and users
        # padded to the activity cap (item int32 + rating float32) in train and test
        need = 64 * R + U * cap * 8 * 2 + U * _ARRAY_OVERHEAD
        return (("data.num_users", "data.num_ratings"), int(need), False,
                f"{R} ratings of {U} users, padded to {cap} ratings a user")
    return None


def check_population_memory(config, available: int | None = None,
                            total: int | None = None) -> None:
    """ConfigError when the synthetic population cannot fit in the host's memory."""
    if getattr(config.data, "prepared", None):     # read from files, never built whole
        return
    if available is None:
        available, total = host_memory()
    if available is None:
        return
    estimate = population_estimate(config)
    if estimate is None:
        return
    keys, need, lower, what = estimate
    if need <= available:
        return
    total_text = f" (of {format_bytes(total)})" if total else ""
    named = ", ".join(f"'{k}'" for k in keys)
    fewer = ("fewer users or ratings" if "data.num_ratings" in keys else
             "fewer clients (or smaller clients, fewer features)")
    raise ConfigError(
        f"config key{'s' * (len(keys) > 1)} {named}: {what}: building them needs "
        f"{'at least' if lower else 'an estimated'} {format_bytes(need)} of host memory, "
        f"but this machine has {format_bytes(available)} available{total_text}; use "
        f"{fewer}")


# ------------------------------------------------------------------- static cohort

def check_robust_cohort(config, cohort: int) -> None:
    """krum / multi_krum score each update by its n - f - 2 nearest others, so the static
    cohort of n slots needs n >= num_byzantine + 3; multi_krum averages num_selected <= n
    of them (``fedjax_lite.core.aggregators`` asserts both while tracing)."""
    g = config.aggregator
    if g.name not in ("krum", "multi_krum"):
        return
    known = known_static_cohort(config)
    what = (f"a cohort of {cohort} ({known[1]})" if known else
            f"a static cohort of {cohort} (the Poisson sampling bound)")
    f = g.num_byzantine
    if cohort - f - 2 < 1:
        most = cohort - 3
        hint = (f"use aggregator.num_byzantine <= {most} or a larger cohort" if most >= 0
                else "use a cohort of at least 3 clients")
        raise ConfigError(
            f"config key 'aggregator.num_byzantine': {g.name} scores each update by its "
            f"n - f - 2 nearest neighbours, so it needs a cohort of n >= num_byzantine + 3 "
            f"clients; got num_byzantine={f} with {what}; {hint}")
    if g.name == "multi_krum" and g.num_selected > cohort:
        raise ConfigError(
            f"config key 'aggregator.num_selected': multi_krum averages num_selected of the "
            f"cohort's updates; got {g.num_selected} with {what}; use "
            f"aggregator.num_selected <= {cohort}")


def known_static_cohort(config) -> tuple[int, str] | None:
    """The static cohort size when it follows from the config alone (fixed or epochs
    sampling: clients_per_round; Poisson with max_cohort_size), else None (the Poisson
    bound depends on the population size)."""
    a = config.algorithm
    if a.sampling != "poisson":
        return a.clients_per_round, "algorithm.clients_per_round"
    if a.max_cohort_size:
        return a.max_cohort_size, "algorithm.max_cohort_size"
    return None


def check_config_cohort(config) -> None:
    """:func:`check_robust_cohort` where the cohort is known from the config alone."""
    known = known_static_cohort(config)
    if known is not None:
        check_robust_cohort(config, known[0])


# ------------------------------------------------------------------------ engine

# engine.micro_cohort (fedjax_lite.core.micro): the FedAvg family, with an aggregator that
# is a sum over clients then a finalization, and per-client faults.
MICRO_COHORT_ALGORITHMS = ("fedavg", "fedavgm", "fedadam", "fedyogi", "fedadagrad",
                           "fedprox", "fedsgd", "fcf")
MICRO_COHORT_AGGREGATORS = ("mean", "norm_bound", "dp_gaussian", "dp_ftrl")
_NEEDS_ALL_UPDATES = {
    "median": "its coordinate-wise median sorts every update",
    "trimmed_mean": "its coordinate-wise trimming sorts every update",
    "krum": "it compares every pair of updates",
    "multi_krum": "it compares every pair of updates",
    "geometric_median": "its Weiszfeld iterations revisit every update",
    "secure_mean": "its SecAgg masks and dropout recovery span the whole cohort",
    "dp_secure_mean": "its SecAgg masks and dropout recovery span the whole cohort",
}


def check_engine(config) -> None:
    """``engine.micro_cohort``: a ConfigError naming it and what cannot run a
    micro-cohort at a time (the algorithm, the aggregator, the attack, compression)."""
    micro = config.engine.micro_cohort
    if micro is None:
        return
    key = "config key 'engine.micro_cohort'"
    name = config.algorithm.name
    if name not in MICRO_COHORT_ALGORITHMS:
        raise ConfigError(f"{key}: algorithm {name} does not run in micro-cohorts yet (only "
                          f"{', '.join(MICRO_COHORT_ALGORITHMS)}); "
                          "leave engine.micro_cohort null")
    agg = config.aggregator.name
    if agg not in MICRO_COHORT_AGGREGATORS:
        why = _NEEDS_ALL_UPDATES.get(agg, "it is not a sum over clients")
        raise ConfigError(f"{key}: aggregator {agg} needs every client's update at once "
                          f"({why}); micro-cohorts work with "
                          f"{', '.join(MICRO_COHORT_AGGREGATORS)}, or leave "
                          "engine.micro_cohort null")
    if config.attack.kind == "gaussian":
        raise ConfigError(f"{key}: attack gaussian draws its noise for the whole cohort's "
                          "update stack; use another attack or leave engine.micro_cohort "
                          "null")
    if config.compression.kind != "none" or config.compression.error_feedback:
        raise ConfigError(f"{key}: uplink compression ({config.compression.kind}) is not "
                          "available in micro-cohorts yet; set compression.kind: none or "
                          "leave engine.micro_cohort null")


__all__ = ["MAX_CONFIG_BYTES", "MICRO_COHORT_AGGREGATORS", "MICRO_COHORT_ALGORITHMS",
           "check_config_cohort", "check_engine", "check_key_types", "check_out_dir",
           "check_population_memory", "check_robust_cohort", "format_bytes", "host_memory",
           "known_static_cohort", "population_estimate", "read_config_file"]
