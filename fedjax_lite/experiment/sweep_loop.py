"""The rounds loop of a prepared (vmapped) sweep group: every member's rows, stops,
checkpoints and outputs, as :func:`fedjax_lite.experiment.runner.run` writes them for one
run (see :mod:`.sweep` and :mod:`.sweep_group`).

Per round the group's program runs once for all M members; the host then applies the
runner's rules to each member's slice of the metrics. Timing fields of a member's rows and
summary (``round_s``, ``clients_per_s``, ``train_s``) are the group program's time shared
evenly by its M members; ``compile_s`` is the group's.
"""

from __future__ import annotations

import os
import platform
import sys
import time

import jax
import numpy as np
import yaml

from fedjax_lite.experiment import config as cfg
from fedjax_lite.experiment.checkpoint import CheckpointError, Checkpointer
from fedjax_lite.experiment.interrupt import Interrupted
from fedjax_lite.experiment.outputs import MetricsWriter, read_metrics, save_params, write_json
from fedjax_lite.experiment.runner import progress_bar
from fedjax_lite.experiment.sweep_group import (add_round, member_row, params_finite,
                                                stop_reason)
from fedjax_lite.experiment.window import EMPTY as EMPTY_WINDOW


class Track:
    """One member's host-side state in the group loop."""

    def __init__(self, member, folder: str, ledger):
        self.name, self.config, self.folder, self.ledger = (member.name, member.config,
                                                            folder, ledger)
        self.show_loss = (not self.config.is_private
                          or self.config.privacy.nonprivate_diagnostics)
        self.window = dict(EMPTY_WINDOW)
        self.stopped: dict | None = None     # {"round", "error", "exit_code"}
        self.done = 0
        self.writer = None

    def stop(self, round_num: int, message: str, code: int, note) -> None:
        self.stopped = {"round": round_num, "error": message, "exit_code": code}
        note(f"{self.name}: {message}")


def run_group(p, out_dir: str, group_name: str, *, resume: bool, progress: bool,
              interrupts) -> dict:
    """Runs prepared group ``p``; returns {member name: summary}."""
    prog = p.programs
    members = p.members
    M, c0 = len(members), members[0].config
    C, rounds = c0.algorithm.clients_per_round, c0.rounds
    names = [m.name for m in members]
    tracks = [Track(m, os.path.join(out_dir, "members", m.name), ledger)
              for m, ledger in zip(members, p.ledgers)]
    ckpt_dir = os.path.join(out_dir, "groups", group_name, "checkpoints")
    ckpt = Checkpointer(ckpt_dir, create=False) if os.path.isdir(ckpt_dir) else None
    latest = ckpt.latest_round() if ckpt is not None else None
    for t in tracks:
        os.makedirs(t.folder, exist_ok=True)
        with open(os.path.join(t.folder, "config.yaml"), "w") as f:
            yaml.safe_dump(cfg.to_dict(t.config), f, sort_keys=False)
    if ckpt is None:
        ckpt = Checkpointer(ckpt_dir)
    ckpt.sharding = prog["where"]
    states, run_keys = prog["states"], prog["run_keys"]
    start, elapsed_before = 0, 0.0
    resumed = resume and latest is not None
    if resumed:
        start, states, _, meta = ckpt.restore(states, run_keys)
        if meta.get("members") != names:
            raise CheckpointError(f"{ckpt_dir} holds another group ({meta.get('members')}), "
                                  f"not {names}: was the grid changed?")
        elapsed_before = float(meta.get("wall_s", 0.0))
        for t, window, stopped in zip(tracks, meta["windows"], meta["stopped"]):
            t.window, t.stopped, t.done = dict(window), stopped, start
    for t in tracks:
        t.writer = MetricsWriter(os.path.join(t.folder, "metrics.jsonl"),
                                 keep_until=start if resumed else None)
    bar = progress_bar(rounds, start, progress, f"{M} members")
    note = bar.write if progress else (lambda msg: print(f"fedjax-lite sweep: {msg}",
                                                        file=sys.stderr))
    t_start = time.perf_counter()
    wall = lambda: elapsed_before + time.perf_counter() - t_start
    total = {"rounds": 0, "time": 0.0}

    def save(round_num: int) -> None:
        ckpt.save(round_num, states, run_keys, {
            "round": round_num, "wall_s": wall(), "members": names,
            "windows": [t.window for t in tracks], "stopped": [t.stopped for t in tracks]})

    def evaluate(round_num: int) -> None:
        ev = jax.tree.map(np.asarray, prog["evaluate"](states.params, prog["test"]))
        for i, t in enumerate(tracks):
            if t.stopped is not None:
                continue
            row_ev = {k: float(v[i]) for k, v in ev.items()}
            if not np.isfinite(row_ev["eval_loss"]):
                t.stop(round_num, f"diverged: non-finite eval loss at round {round_num}", 3,
                       note)
                continue
            t.writer.write(member_row(t, round_num, row_ev, wall(), C))
            t.window = dict(EMPTY_WINDOW)

    if start == 0:
        evaluate(0)
    last_saved = start if resumed else None
    if interrupts is not None:
        interrupts.out_dir, interrupts.phase = out_dir, "training"
    try:
        for r in range(start, rounds):
            if interrupts is not None and interrupts.requested is not None:
                if last_saved != r:
                    save(r)
                raise Interrupted(interrupts.requested, r)
            for t in tracks:
                if t.stopped is None and t.ledger is not None and t.ledger.would_exceed(r + 1):
                    t.stop(r, f"privacy budget: round {r + 1} would exceed target epsilon "
                              f"{t.ledger.target}; stopped after round {r}", 2, note)
            tic = time.perf_counter()
            new_states, metrics = prog["round"](prog["vals"], states, prog["population"],
                                                run_keys, np.int32(r))
            jax.block_until_ready(new_states)
            dt = time.perf_counter() - tic
            host = jax.tree.map(np.asarray, metrics)
            finite = (params_finite(new_states.params)
                      if any(not t.show_loss for t in tracks) else None)
            for i, t in enumerate(tracks):
                if t.stopped is not None:
                    continue
                mine = {k: v[i] for k, v in host.items()}
                why = stop_reason(t, r, mine, None if finite is None else bool(finite[i]),
                                  p.bound, p.overflow_p)
                if why is not None:
                    t.stop(r, *why, note)
                    continue
                add_round(t, mine, float(mine["train_loss"]), dt / M, note)
                t.done = r + 1
            states, done = new_states, r + 1
            total = {"rounds": total["rounds"] + 1, "time": total["time"] + dt}
            if done % c0.eval_every == 0 or done == rounds:
                evaluate(done)
            if c0.checkpoint_every and done % c0.checkpoint_every == 0:
                save(done)
                last_saved = done
            bar.update(1)
        if interrupts is not None and interrupts.requested is not None:
            if last_saved != rounds:
                save(rounds)
            raise Interrupted(interrupts.requested, rounds)
    finally:
        bar.close()
        if interrupts is not None:
            interrupts.phase = "setup"
    if last_saved != rounds:
        save(rounds)
    ckpt.close()
    params = jax.tree.map(np.asarray, states.params)      # [M, ...] on the host, once
    return {t.name: _finish(t, i, p, params, group_name, names, total, wall(),
                            start if resumed else None)
            for i, t in enumerate(tracks)}


def _finish(t: Track, i: int, p, params, group_name: str, names: list, total: dict,
            wall_s: float, resumed_from) -> dict:
    """Writes member i's params.npz and summary.json (the runner's summary, plus what the
    sweep adds); returns the summary."""
    config = t.config
    C, M = config.algorithm.clients_per_round, len(names)
    save_params(os.path.join(t.folder, "params.npz"),
                jax.tree.map(lambda a: a[i], params))
    rows = read_metrics(os.path.join(t.folder, "metrics.jsonl"))
    share = total["time"] / M
    train, test = p.train, p.test
    summary = {
        "rounds": config.rounds, "final": dict(rows[-1]) if rows else {},
        "wall_s": wall_s, "train_s": share,
        "clients_per_s": (C * total["rounds"] / share) if total["rounds"] else None,
        "compile_s": p.compile_s, "seed": config.seed, "clients_per_round": C,
        "num_clients": train.num_clients,
        **({"num_train_examples": train.num_examples,
            "num_test_examples": test.num_examples} if t.show_loss else {}),
        "resumed_from_round": resumed_from, "storage": "device",
        "sampling": {"kind": config.algorithm.sampling, "static_cohort_size": p.bound,
                     "overflow_probability_per_round": p.overflow_p},
        **({} if t.ledger is None else {"privacy": t.ledger.summary(config, config.rounds)}),
        "jax_version": jax.__version__, "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()], "processes": jax.process_count(),
        "python": platform.python_version(),
        "stopped": t.stopped,
        "sweep": {"group": group_name, "members": names, "vmapped": True,
                  "swept_keys": p.swept + ["seed"], "split": p.split_note or None,
                  "program_compile_s": p.compile_s, "program_train_s": total["time"],
                  "timing": "train_s, clients_per_s and the rows' round_s: the group "
                            "program's time shared evenly by its members"},
    }
    write_json(os.path.join(t.folder, "summary.json"), summary)
    return summary


__all__ = ["run_group"]
