"""A sweep's vmapped group: members that differ only in swept numeric keys and seeds,
compiled into ONE program with a leading member axis (see :mod:`.sweep` for the design).

:func:`prepare` builds the group's programs before anything is written: the initial states
(``vmap`` over the members' init keys), the round (``vmap`` over the members' states, run
keys and swept values; the population and test data are shared, ``in_axes=None``) and the
evaluation (``vmap`` over the members' parameters). The algorithm is built inside the
vmapped function by the ordinary builders, from a config whose swept keys are
:class:`~.swept.Swept` values, so a member computes what its own run computes. When the
builders need a swept key as a concrete number (:class:`~.swept.NotVmappable`), or the
members' static cohort bounds differ, the group is split and each part prepared again.

:class:`GroupRun` then runs the rounds loop of :func:`fedjax_lite.experiment.runner.run`
for every member at once: the same rows (the runner's row logic, per member), the same
stop rules per member (a member that diverges, overflows its Poisson bound or would exceed
its privacy budget stops there with its message and its files; the others go on), a
stacked checkpoint of the whole group every ``checkpoint_every`` rounds, and Ctrl-C
handled like the runner's (checkpoint, :class:`Interrupted`).
"""

from __future__ import annotations

import dataclasses
import math
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.core import Sampling, build_evaluate, build_round, round_key
from fedjax_lite.core.local import MEMBERS_AXIS
from fedjax_lite.experiment import config as cfg
from fedjax_lite.experiment import distributed
from fedjax_lite.experiment.builders import (build_algorithm, build_model, cohort_bound,
                                             engine_options)
from fedjax_lite.experiment.swept import Swept, not_vmappable
from fedjax_lite.experiment.window import add_round as add_window_round
from fedjax_lite.experiment.window import metrics_row

NOISE_KEY = "aggregator.noise_multiplier"


def substitute(obj, path: list[str], value):
    """``obj`` (a config dataclass) with the key at ``path`` replaced by ``value``."""
    head, rest = path[0], path[1:]
    if isinstance(obj, cfg.OptimizerConfig):
        return dataclasses.replace(obj, kwargs={**obj.kwargs, head: value})
    new = value if not rest else substitute(getattr(obj, head), rest, value)
    return dataclasses.replace(obj, **{head: new})


def lookup(config: cfg.Config, key: str):
    obj = config
    for part in key.split("."):
        obj = obj.kwargs[part] if isinstance(obj, cfg.OptimizerConfig) else getattr(obj, part)
    return obj


class Alone(NamedTuple):
    """A member that runs alone (through ``runner.run``), and why."""
    member: object
    why: str


@dataclasses.dataclass
class Prepared:
    """A group ready to run: its members, what is swept, the compiled programs and the
    initial stacked state."""
    members: list
    swept: list[str]
    ledgers: list
    bound: int
    overflow_p: float
    train: object
    test: object
    programs: dict
    compile_s: float
    split_note: str = ""


def _privacy(member, K: int, ledgers: dict):
    """(setup, ledger) of a DP member (None, None otherwise); ledgers shared by setup."""
    config = member.config
    if not config.is_private:
        return None, None
    from fedjax_lite.experiment import privacy_run
    try:
        _, setup = privacy_run.resolve(config, K)
    except cfg.ConfigError as e:
        raise cfg.ConfigError(f"sweep member {member.name}: {e}") from None
    key = (repr(setup), config.privacy.delta, config.privacy.target_epsilon)
    if key not in ledgers:
        ledgers[key] = privacy_run.Ledger(setup, config.privacy.delta,
                                          config.privacy.target_epsilon)
    return setup, ledgers[key]


def _split(members, value_of, why: str, train, test, swept_keys) -> list:
    buckets: dict = {}
    for m in members:
        buckets.setdefault(value_of(m), []).append(m)
    out = []
    for part in buckets.values():
        out += prepare(part, train, test, swept_keys, note=why)
    return out


def prepare(members: list, train, test, swept_keys: list[str], note: str = "") -> list:
    """Prepared groups (vmapped) and :class:`Alone` members covering ``members``, which
    share everything but ``swept_keys`` and seeds. Compiles; writes nothing."""
    from fedjax_lite.experiment.runner import check_static_cohort
    if len(members) < 2:
        return [Alone(m, note or "alone in its group") for m in members]
    K = train.num_clients
    ledgers, setups, bounds = [], [], []
    shared: dict = {}
    for m in members:
        setup, ledger = _privacy(m, K, shared)
        setups.append(setup)
        ledgers.append(ledger)
        bounds.append(cohort_bound(m.config, K, ledger))
        check_static_cohort(m.config, bounds[-1][0])
    if len({b for b, _ in bounds}) > 1:
        by = {m.name: b for m, (b, _) in zip(members, bounds)}
        return _split(members, lambda m: by[m.name], "static cohort bounds differ",
                      train, test, swept_keys)
    values = {k: [float(lookup(m.config, k)) for m in members] for k in swept_keys
              if len({lookup(m.config, k) for m in members}) > 1 and k != NOISE_KEY}
    if setups[0] is not None and len({s.noise_multiplier for s in setups}) > 1:
        values[NOISE_KEY] = [s.noise_multiplier for s in setups]
    try:
        t0 = time.perf_counter()
        programs = _compile(members, train, test, values, setups[0], bounds[0][0])
        compile_s = time.perf_counter() - t0
    except Exception as e:  # noqa: BLE001 -- only a NotVmappable cause is handled
        cause = not_vmappable(e)
        if cause is None:
            raise
        key = cause.key if cause.key is not None else (
            next(iter(values)) if len(values) == 1 else None)
        if key in values:           # split by that key; each part vmapped over the rest
            index = {m.name: v for m, v in zip(members, values[key])}
            return _split(members, lambda m: index[m.name], f"{key}: {cause.why}",
                          train, test, [k for k in swept_keys if k != key])
        if values:                  # some swept key: keep only the seeds vmapped
            rows = {m.name: tuple(v[i] for v in values.values())
                    for i, m in enumerate(members)}
            return _split(members, lambda m: rows[m.name], str(cause), train, test, [])
        return [Alone(m, str(cause)) for m in members]   # not even the seeds vmap
    return [Prepared(members, list(values), ledgers, bounds[0][0], bounds[0][1], train,
                     test, programs, compile_s, note)]


def _compile(members, train, test, values: dict, setup0, bound: int) -> dict:
    """The group's jitted, compiled programs and its initial states (see the module
    docstring)."""
    c0 = members[0].config
    K, C = train.num_clients, c0.algorithm.clients_per_round
    kind = c0.algorithm.sampling
    # unroll 1: the step loop's body is already M members wide, so unrolling it buys no
    # round time and costs compile time (benchmarks/sweep.py's workload: the same round
    # time, ~1.5 s less compiling); the arithmetic is the same either way
    engine = engine_options(c0.engine, train.n)._replace(unroll=1)
    model = build_model(c0, train.feature_shape)
    hosts = {k: tuple(v) for k, v in values.items()}

    def build(vals):
        config, setup = c0, setup0
        for key, value in vals.items():
            swept = Swept(value, hosts[key], key)
            if key == NOISE_KEY:
                setup = dataclasses.replace(setup, noise_multiplier=swept)
            else:
                config = substitute(config, key.split("."), swept)
        try:
            return build_algorithm(config, model, engine, num_clients=K, privacy=setup)
        except cfg.ConfigError:
            raise
        except ValueError as e:        # a builder's argument check (names the argument)
            if not_vmappable(e) is not None:
                raise
            raise cfg.ConfigError(f"config: {e}") from None

    if not values:     # seeds only: built once, outside any trace, like the runner's
        algorithm = build({})
        build = lambda vals: algorithm

    def init_one(vals, init_key):
        return build(vals).init(model.init(init_key))

    def round_one(vals, state, population, run_key, r):
        sampling = Sampling(kind, bound if kind == "poisson" else None,
                            run_key if kind == "epochs" else None)
        one = build_round(build(vals), num_clients=K, clients_per_round=C,
                          sampling=sampling)
        return one(state, population, round_key(run_key, r))

    where, put, jit = distributed.placement(engine.mesh)
    keys = [jax.random.split(jax.random.key(m.config.seed)) for m in members]
    init_keys = jnp.stack([k[0] for k in keys])
    run_keys = jnp.stack([k[1] for k in keys])
    vals = {k: jnp.asarray(v, jnp.float32) for k, v in values.items()}
    states = jit(jax.vmap(init_one))(vals, init_keys)
    population, test_data = put(train.arrays()), put(test.arrays())
    rounds = jit(jax.vmap(round_one, in_axes=(0, 0, None, 0, None),
                          axis_name=MEMBERS_AXIS)).lower(
        vals, states, population, run_keys, np.int32(0)).compile()
    eval_engine = engine._replace(chunk_size=None if engine.chunk_size is None
                                  else 4 * engine.chunk_size)
    evaluate = jit(jax.vmap(build_evaluate(model, eval_engine), in_axes=(0, None))).lower(
        states.params, test_data).compile()
    return {"round": rounds, "evaluate": evaluate, "states": states, "vals": vals,
            "run_keys": run_keys, "population": population, "test": test_data,
            "where": where, "devices": 1 if engine.mesh is None else engine.mesh.size}


def params_finite(params) -> np.ndarray:
    """bool[M]: whether each member's parameters are all finite."""
    leaves = [np.asarray(x) for x in jax.tree.leaves(params)]
    M = leaves[0].shape[0]
    return np.all([np.isfinite(x.reshape(M, -1)).all(1) for x in leaves], axis=0)


def member_row(track, round_num: int, ev: dict, wall: float, C: int) -> dict:
    """The runner's metrics row for one member, from its window."""
    return metrics_row(track.window, round_num, ev, wall, C, track.show_loss, track.ledger)


def add_round(track, metrics: dict, loss: float, dt: float, note) -> None:
    """Adds one round's metrics to a member's window (the runner's rule)."""
    track.window, silent = add_window_round(track.window, metrics, loss, dt,
                                            track.config, track.show_loss)
    if silent:
        note(f"{track.name}: round {track.done + 1}: no sampled client reported; "
             "model unchanged")


def stop_reason(track, r: int, metrics: dict, finite_params: bool, bound: int,
                overflow_p: float) -> tuple[str, int] | None:
    """(message, exit code) when member ``track``'s own run would stop in round r + 1
    (the runner's messages), else None."""
    if float(metrics.get("sampling_overflow", 0.0)) > 0:
        return (f"sampling: round {r + 1}: Poisson sampling drew more than the static "
                f"cohort bound of {bound} clients (probability {overflow_p:.2g} per "
                f"round); the round was discarded and the member stopped after round {r}; "
                "raise algorithm.max_cohort_size", 2)
    loss = float(metrics["train_loss"])
    finite = finite_params if not track.show_loss else math.isfinite(loss)
    if not finite:
        return (f"diverged: non-finite {'model' if not track.show_loss else 'training loss'}"
                f" in round {r + 1}; the member stopped after round {r} (the rest of its "
                "group went on)", 3)
    return None


__all__ = ["Alone", "Prepared", "member_row", "prepare", "substitute"]
