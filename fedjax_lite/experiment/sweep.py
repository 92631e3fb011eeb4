"""``fedjax-lite sweep``: a grid of configurations x seeds, vmapped into one program where
the members differ only in numbers.

    fedjax-lite sweep CONFIG --grid algorithm.client_optimizer.learning_rate=0.01,0.03,0.1 \\
        --grid algorithm.mu=0,0.1,1 --seeds 0,1,2 --out DIR [--set KEY=VALUE ...] [--resume]

Decisions:

* Members are the cartesian product of the ``--grid`` values (each parsed as YAML, like
  ``--set``; a value cannot contain a comma) and the ``--seeds`` (default: the config's
  seed), seeds innermost, with the ``--set`` overrides applied to all. A grid over
  ``algorithm.name`` or ``aggregator.name`` drops the base's keys a member's method does
  not take, as ``compare`` does. Every member is a
  full Config from the normal parser (plus the CLI's cohort and memory checks): a bad one
  is a one-line ConfigError naming the member and the key, before anything runs or is
  written. A member's NAME is its grid values by the key's last part (``learning_rate`` ->
  ``lr``; longer suffixes where two keys would share a name) and its seed, e.g.
  ``lr=0.01,mu=0.1,seed=2``, with characters outside ``[A-Za-z0-9._,=+-]`` replaced by ``_``.
* Vmappable keys: every numeric argument of ``algorithm.client_optimizer`` and
  ``algorithm.server_optimizer`` (learning rates, momentum, ...), ``algorithm.mu``,
  ``aggregator.clip_norm``, ``aggregator.noise_multiplier`` and ``aggregator.max_norm``,
  and the seed (unless an attack picks its attackers from it). Members are grouped by
  everything else, including the DATA seed (``data.seed``, else the run's seed): members
  whose data differ cannot share a population. So a seed sweep is one program only with
  a fixed ``data.seed`` (e.g. ``--set data.seed=0``); without it each seed is its own
  group, still vmapped over the grid.
* A group of two or more members runs as ONE compiled program (:mod:`.sweep_group`): a
  leading member axis on the server state, the members' swept values and keys, the
  population and test data shared (not copied per member). The algorithm is built inside
  the vmapped function by the normal builders from :class:`~.swept.Swept` values, so a
  member computes what its own run computes (tested: metrics equal to ``runner.run`` of
  the member alone to 1e-5). Where a builder needs a swept value as a concrete number
  (e.g. SCAFFOLD probes its learning rate with NumPy, adaptive clipping splits its noise
  multiplier with ``math``), the group is
  split by that key and each part vmapped over the rest. Groups of one and configs the
  program does not cover (recommenders, ``privacy.secure_mode``, the pmap backend, host or
  mmap storage, several processes) run alone through ``runner.run``.
* DP members: each member's epsilon is accounted on the host with its own resolved noise
  multiplier (``privacy_run``), as its own run would.
* A group's program runs one round per call (``engine.compile_rounds`` is not used there;
  results are the same) with the step loop not unrolled (``engine.unroll`` 1: the body is
  already M members wide); a member's timing fields are the program's time shared evenly.
* Outputs in DIR: ``members/NAME/`` with ``config.yaml``, ``metrics.jsonl``,
  ``summary.json`` (+ ``params.npz``; members run alone also have the runner's
  ``curves.png`` and checkpoints), ``groups/FIRST_MEMBER/checkpoints`` (a vmapped group's
  stacked state), ``comparison.md`` / ``comparison.json`` (mean +- std over seeds per
  configuration, the best configuration by the final value of the first eval metric) and
  ``curves.png`` (mean over seeds, band = min..max), made with :mod:`.compare`'s table and
  plot. A member that diverges (or overflows its Poisson bound, or would exceed its privacy
  budget) stops with its own run's message; the rest go on; it is listed under the table
  and left out of the means and the best configuration.
* Interrupts: Ctrl-C stops a vmapped group after its current round (checkpointed) or a
  member run alone like ``run``; finished members' files stay, and ``--resume`` keeps
  finished members, continues groups from their checkpoints and starts the rest (every
  member's saved config must equal its config now).
"""

from __future__ import annotations

import copy
import itertools
import json
import os
import re
import sys

from fedjax_lite.experiment import config as cfg
from fedjax_lite.experiment.config_schema import OutputError

ABBREVIATIONS = {"learning_rate": "lr", "noise_multiplier": "noise", "clip_norm": "clip"}
VMAPPABLE = ("algorithm.mu", "aggregator.clip_norm", "aggregator.noise_multiplier",
             "aggregator.max_norm")
_UNSAFE = re.compile(r"[^A-Za-z0-9._,=+-]")


class Member:
    """One configuration x seed: ``name`` (its folder), ``label`` (the configuration,
    without the seed), ``config``."""

    def __init__(self, name: str, label: str, config: cfg.Config):
        self.name, self.label, self.config = name, label, config

    def __repr__(self) -> str:
        return f"Member({self.name})"


def parse_grid(spec: str) -> tuple[str, list[str]]:
    """``KEY.PATH=V1,V2,...`` -> (key, value texts)."""
    if "=" not in spec:
        raise cfg.ConfigError(f"--grid {spec!r}: expected KEY.PATH=V1,V2,...")
    key, text = (s.strip() for s in spec.split("=", 1))
    if not key or not all(key.split(".")):
        raise cfg.ConfigError(f"--grid {spec!r}: empty key")
    if key == "seed":
        raise cfg.ConfigError("--grid seed=...: give seeds with --seeds 0,1,2")
    values = [v.strip() for v in text.split(",")]
    if not text.strip() or not all(values):
        raise cfg.ConfigError(f"--grid {spec!r}: expected comma-separated values, "
                              "none empty")
    if len(set(values)) < len(values):
        raise cfg.ConfigError(f"--grid {spec!r}: a value is repeated")
    return key, values


def parse_seeds(text: str) -> list[int]:
    seeds = []
    for part in text.split(","):
        try:
            seed = int(part.strip())
        except ValueError:
            raise cfg.ConfigError(f"--seeds {text!r}: expected comma-separated integers "
                                  ">= 0, e.g. 0,1,2") from None
        if seed < 0 or seed > cfg.SEED_MAX or seed in seeds:
            raise cfg.ConfigError(f"--seeds {text!r}: {seed} is "
                                  f"{'repeated' if seed in seeds else 'out of range'}")
        seeds.append(seed)
    return seeds


def short_names(keys: list[str]) -> dict[str, str]:
    """Each key's shortest unique suffix (``learning_rate`` written ``lr``)."""
    def suffix(key: str, n: int) -> str:
        parts = key.split(".")
        return ".".join(parts[-n:-1] + [ABBREVIATIONS.get(parts[-1], parts[-1])])
    names = {}
    for key in keys:
        n = 1
        while any(suffix(key, n) == suffix(o, n) for o in keys if o != key) and \
                n < len(key.split(".")):
            n += 1
        names[key] = suffix(key, n)
    return names


def safe(text: str) -> str:
    return _UNSAFE.sub("_", text)[:120]


def plan(raw: dict, grids: list[str], seeds: str | None) -> list[Member]:
    """Every member, validated (ConfigError naming the member and key) before any run."""
    from fedjax_lite.experiment.config_checks import (check_config_cohort,
                                                      check_population_memory)
    grid = [parse_grid(g) for g in grids]
    keys = [k for k, _ in grid]
    if len(set(keys)) < len(keys):
        raise cfg.ConfigError(f"--grid: key {next(k for k in keys if keys.count(k) > 1)!r} "
                              "given twice")
    seed_list = parse_seeds(seeds) if seeds else [raw.get("seed", 0)]
    short = short_names(keys)
    members, names = [], set()
    for combo in itertools.product(*[values for _, values in grid]):
        label = ",".join(f"{short[k]}={safe(v)}" for k, v in zip(keys, combo))
        for seed in seed_list:
            name = safe(",".join(filter(None, [label, f"seed={seed}"])))
            r = copy.deepcopy(raw)
            try:
                for key, text in zip(keys, combo):
                    cfg.set_override(r, f"{key}={text}")
                r = _scoped(r, keys)
                r["seed"] = seed
                config = cfg.parse(r)
                check_config_cohort(config)
                check_population_memory(config)
            except cfg.ConfigError as e:
                raise cfg.ConfigError(f"sweep member {name}: {e}") from None
            if name in names:
                raise cfg.ConfigError(f"--grid: two members would share the folder name "
                                      f"{name!r}; write their values differently")
            names.add(name)
            members.append(Member(name, label or "base", config))
    return members


def _scoped(raw: dict, keys: list[str]) -> dict:
    """A grid over ``algorithm.name`` / ``aggregator.name``: keys of the base that the
    member's algorithm (aggregator) does not take are dropped, and a FedOpt name gets its
    own server optimizer, as in ``compare`` (:func:`.compare.method_raw`)."""
    if "algorithm.name" not in keys and "aggregator.name" not in keys:
        return raw
    from fedjax_lite.experiment.compare import method_raw
    section = lambda name: raw.get(name) if isinstance(raw.get(name), dict) else {}
    aggregator = section("aggregator").get("name") if "aggregator.name" in keys else None
    return method_raw(raw, section("algorithm").get("name", "fedavg"), aggregator)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def vmappable_key(key: str) -> bool:
    parts = key.split(".")
    optimizer = parts[:2] in (["algorithm", "client_optimizer"],
                              ["algorithm", "server_optimizer"])
    return (optimizer and len(parts) == 3 and parts[2] != "name") or key in VMAPPABLE


def not_vmappable_reason(config: cfg.Config) -> str | None:
    """Why a member cannot join a vmapped program (None: it can)."""
    import jax
    if config.algorithm.name in cfg.RECOMMENDATION_ALGORITHMS:
        return "recommenders run alone"
    if config.is_private and config.privacy.secure_mode:
        return "privacy.secure_mode draws each run's keys from the OS"
    if config.engine.backend == "pmap":
        return "engine.backend pmap"
    if getattr(config.data, "storage", "device") not in ("auto", "device") or getattr(
            config.data, "prepared", None):
        return "the population is not on the device (data.storage)"
    if jax.process_count() > 1:
        return "several processes"
    if config.eval.train:
        return "eval.train evaluates each run on its own training data"
    if config.algorithm.name == "ditto":
        return "ditto evaluates each run's personal models"
    return None


def signature(config: cfg.Config) -> tuple:
    """What members of one vmapped group share: everything but the vmappable numbers
    (their presence counts) and the seed, plus the data seed."""
    seed_free = config.attack.kind == "none"
    sig = []
    for key, value in _flatten(cfg.to_dict(config)).items():
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        if vmappable_key(key) and number:
            value = "<swept>"
        elif key == "seed" and seed_free:
            continue
        sig.append((key, repr(value)))
    return tuple(sig) + (("<data seed>", repr(config.data_seed)),)


def group_members(members: list[Member]) -> list[list[Member]]:
    groups: dict = {}
    for m in members:
        groups.setdefault(signature(m.config), []).append(m)
    return list(groups.values())


def swept_keys(group: list[Member]) -> list[str]:
    flat = [_flatten(cfg.to_dict(m.config)) for m in group]
    return [k for k in flat[0] if vmappable_key(k) and len({repr(f[k]) for f in flat}) > 1]


def check_out(out_dir: str, members: list[Member], resume: bool) -> None:
    """A sweep folder is only continued with --resume, and only with the same configs."""
    holds = any(os.path.isdir(os.path.join(out_dir, d)) for d in ("members", "groups"))
    if holds and not resume:
        raise OutputError(f"{out_dir} already holds a sweep; pass --resume to continue it "
                          "or choose another --out (nothing was overwritten)")
    if not resume:
        return
    from fedjax_lite.experiment.checkpoint import _first_difference
    for m in members:
        path = os.path.join(out_dir, "members", m.name, "config.yaml")
        if os.path.exists(path):
            saved = cfg.to_dict(cfg.parse(cfg.load_raw(path)))
            diff = _first_difference(saved, cfg.to_dict(m.config))
            if diff:
                raise cfg.ConfigError(f"--resume: sweep member {m.name}: config differs "
                                      f"from {path}: {diff}")


def _finished(folder: str, config: cfg.Config) -> dict | None:
    """The summary of a member that completed (or stopped) with this config, else None."""
    from fedjax_lite.experiment.compare import _finished as completed
    summary = completed(folder, config)
    if summary is None:
        try:
            with open(os.path.join(folder, "summary.json")) as f:
                summary = json.load(f)
        except (OSError, ValueError):
            return None
        if not summary.get("stopped") or summary.get("rounds") != config.rounds:
            return None
    return summary


def sweep(raw: dict, out_dir: str, *, grids: list[str], seeds: str | None = None,
          progress: bool = True, interrupts=None, resume: bool = False) -> dict:
    """Runs every member (see the module docstring); returns the comparison document."""
    from fedjax_lite.experiment.sweep_group import Alone, Prepared, prepare
    from fedjax_lite.experiment.sweep_loop import run_group
    from fedjax_lite.experiment.sweep_report import write_report
    members = plan(raw, grids, seeds)
    check_out(out_dir, members, resume)
    os.makedirs(out_dir, exist_ok=True)
    summaries, units = {}, []
    for group in group_members(members):
        _deferring_signals(interrupts, out_dir)
        why = not_vmappable_reason(group[0].config)
        done = {m.name: _finished(os.path.join(out_dir, "members", m.name), m.config)
                if resume else None for m in group}
        if len(group) > 1 and why is None and all(done.values()):
            summaries.update(done)
            units.append({"members": [m.name for m in group], "vmapped": True,
                          "note": "finished earlier"})
            continue
        parts = [Alone(m, why or "alone in its group") for m in group]
        if len(group) > 1 and why is None:
            train, test = _group_data(group[0])
            if _on_device(group[0].config, train):
                parts = prepare(group, train, test, swept_keys(group))
            else:
                parts = [Alone(m, "data.storage auto keeps this population off the device")
                         for m in group]
        for part in parts:
            _deferring_signals(interrupts, out_dir)
            if isinstance(part, Prepared):
                names = [m.name for m in part.members]
                if progress:
                    print(f"== vmapped group of {len(names)} members ({names[0]} ...; "
                          f"compiled in {part.compile_s:.1f} s)", file=sys.stderr, flush=True)
                summaries.update(run_group(part, out_dir, names[0], resume=resume,
                                           progress=progress, interrupts=interrupts))
                units.append({"members": names, "vmapped": True, "swept": part.swept,
                              "note": part.split_note or None})
            else:
                m = part.member
                summaries[m.name] = _run_alone(m, out_dir, resume, progress, interrupts,
                                               done.get(m.name))
                units.append({"members": [m.name], "vmapped": False, "note": part.why})
    if interrupts is not None:
        interrupts.phase = "setup"
    return write_report(out_dir, members, summaries, units)


def _deferring_signals(interrupts, out_dir: str) -> None:
    """Between members and while a group compiles, a first SIGINT / SIGTERM is recorded
    (not an immediate exit): the next member or group stops at its round 0, checkpointed,
    so the CLI says how to continue (``--resume``); finished members are kept."""
    from fedjax_lite.experiment.interrupt import Interrupted
    if interrupts is None:
        return
    if interrupts.requested is not None:
        raise Interrupted(interrupts.requested, 0)
    interrupts.out_dir, interrupts.phase = out_dir, "training"


def _group_data(member: Member):
    from fedjax_lite.experiment.builders import apply_label_attack, build_data
    from fedjax_lite.experiment.runner import DataError
    try:
        train, test = build_data(member.config)
    except cfg.ConfigError:
        raise
    except (ValueError, FileNotFoundError) as e:
        raise DataError(f"sweep member {member.name}: {e}") from e
    return apply_label_attack(member.config, train), test


def _on_device(config: cfg.Config, train) -> bool:
    """Whether the member's own run keeps the population on the device (``data.storage``
    resolved as the runner resolves it)."""
    from fedjax_lite.experiment import storage
    return storage.resolve(config, train) == "device"


def _run_alone(m: Member, out_dir: str, resume: bool, progress: bool, interrupts,
               finished: dict | None) -> dict:
    """A member through ``runner.run`` in members/NAME (a stop is recorded, not raised)."""
    from fedjax_lite.experiment.outputs import read_metrics, write_json
    from fedjax_lite.experiment.runner import DivergenceError, SamplingError, run
    folder = os.path.join(out_dir, "members", m.name)
    if finished is not None:
        if progress:
            print(f"== {m.name}: finished earlier", file=sys.stderr, flush=True)
        return finished
    if progress:
        print(f"== {m.name} (run alone)", file=sys.stderr, flush=True)
    holds = os.path.isdir(os.path.join(folder, "checkpoints"))
    try:
        return run(m.config, folder, resume=resume and holds, progress=progress,
                   interrupts=interrupts)
    except (DivergenceError, SamplingError) as e:
        kind, code = ("diverged", 3) if isinstance(e, DivergenceError) else ("sampling", 2)
        path = os.path.join(folder, "metrics.jsonl")
        rows = read_metrics(path) if os.path.exists(path) else []
        summary = {"rounds": m.config.rounds, "final": dict(rows[-1]) if rows else {},
                   "seed": m.config.seed, "wall_s": None, "compile_s": None,
                   "clients_per_s": None,
                   "stopped": {"round": rows[-1]["round"] if rows else 0,
                               "error": f"{kind}: {e}", "exit_code": code}}
        write_json(os.path.join(folder, "summary.json"), summary)
        print(f"fedjax-lite sweep: {m.name}: {kind}: {e}", file=sys.stderr)
        return summary


__all__ = ["Member", "group_members", "parse_grid", "parse_seeds", "plan", "signature",
           "sweep"]
