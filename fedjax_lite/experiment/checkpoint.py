"""Checkpoints with orbax-checkpoint (never pickle): server state, root key, round.

Layout: ``DIR/checkpoints/<round>/`` managed by ``orbax.checkpoint.CheckpointManager``,
which writes to a temporary folder and renames it when complete, so a process killed
mid-save leaves the previous checkpoint as the latest one.

Every checkpoint's metadata carries a SHA-256 of the saved arrays' bytes
(``state_sha256``): a restore that reads different bytes (a bit flip, a truncated array
file that still decodes) is detected, not trained on. :meth:`Checkpointer.restore` tries
the checkpoints newest first; an unusable one (unreadable, missing an item, garbage
metadata, checksum mismatch) is moved to ``DIR/checkpoints_unusable/<round>/`` and named
with its reason in :attr:`Checkpointer.skipped`; if none is usable,
:class:`CheckpointError` says why for each.

:meth:`Checkpointer.restore` places the arrays on :attr:`Checkpointer.sharding` (the run's
replicated sharding), so a checkpoint restores whatever topology wrote it (one process or
several, any number of devices). With several processes (``jax.distributed``) every
process calls :meth:`~Checkpointer.save` and :meth:`~Checkpointer.restore` alike: the
saved items are first placed on ``sharding`` (global arrays; orbax writes them from the
primary process and reads them in every process); only process 0 moves an unusable
checkpoint aside.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


def check_resume(config, resolved: dict, config_path: str, latest: int | None) -> None:
    """``--resume``: the saved run's config (``config_path``) must equal ``config`` except
    for ``rounds``, which may only grow (or shrink to no less than the latest checkpoint)
    and not at all in a DP run. Raises OutputError / ConfigError."""
    from fedjax_lite.experiment import config as cfg
    from fedjax_lite.experiment.config_schema import OutputError
    if not os.path.exists(config_path) or latest is None:
        raise OutputError("--resume: no checkpoint to resume from in "
                          f"{os.path.dirname(config_path)}")
    saved = cfg.to_dict(cfg.parse(cfg.load_raw(config_path)))
    diff = _first_difference({**saved, "rounds": None}, {**resolved, "rounds": None})
    if diff:
        raise cfg.ConfigError(f"--resume: config differs from {config_path}: {diff}")
    if saved["rounds"] != config.rounds:
        # only extending (or shortening to no less than the saved rounds) is safe, and
        # only where rounds does not enter the round itself (a DP run's accounting
        # and Poisson cohort bound depend on the total)
        if config.is_private:
            raise cfg.ConfigError(f"--resume: rounds differs from {config_path} "
                                  f"({saved['rounds']} saved, {config.rounds} now); a "
                                  "DP run's accounting is fixed for its rounds")
        if config.rounds < latest:
            raise cfg.ConfigError(f"--resume: rounds={config.rounds} is below the "
                                  f"latest checkpoint (round {latest})")


def _first_difference(a: dict, b: dict, prefix: str = "") -> str | None:
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            d = _first_difference(va, vb, f"{prefix}{k}.")
            if d:
                return d
        elif va != vb:
            return f"{prefix}{k} ({va!r} in the saved run, {vb!r} now)"
    return None


class CheckpointError(RuntimeError):
    """No usable checkpoint (the message names each one and why)."""


def state_digest(tree: Any) -> str:
    """SHA-256 over the leaves' dtypes, shapes and bytes, in tree order."""
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.asarray(leaf)
        h.update(f"{a.dtype}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def _reason(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:160]}{'...' if len(text) > 160 else ''}"


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2, create: bool = True, sharding=None):
        self.directory = os.path.abspath(directory)
        self.keep = keep
        self.sharding = sharding         # where the run's state lives (replicated)
        self.skipped: list[tuple[int, str]] = []     # (round, why) of unusable checkpoints
        self._manager = self._open(create)

    def _open(self, create: bool):
        return ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=self.keep, create=create,
                                                 enable_async_checkpointing=False))

    def latest_round(self) -> int | None:
        if not os.path.isdir(self.directory):
            return None
        return self._manager.latest_step()

    def save(self, round_num: int, state: Any, root_key: jax.Array, meta: dict) -> None:
        items = {"state": state, "root_key": jax.random.key_data(root_key)}
        if self.sharding is not None and jax.process_count() > 1:
            from fedjax_lite.experiment.distributed import replicate
            items = replicate(items, self.sharding)       # global arrays, as orbax wants
        meta = {**meta, "state_sha256": state_digest(items)}
        self._manager.save(round_num, args=ocp.args.Composite(
            state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def _restore_step(self, step: int, abstract) -> tuple[Any, dict]:
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        items, meta = out["state"], out["meta"]
        if not isinstance(meta, dict) or "round" not in meta:
            raise ValueError("metadata is not the run's (no 'round')")
        want = meta.get("state_sha256")
        if want is not None and state_digest(items) != want:
            raise ValueError("array bytes differ from the checksum written with them")
        return items, dict(meta)

    def _set_aside(self, step: int) -> None:
        """Moves an unusable checkpoint out of orbax's view (kept for inspection)."""
        aside = os.path.join(os.path.dirname(self.directory), "checkpoints_unusable")
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, str(step))
        if os.path.exists(target):
            shutil.rmtree(target)
        shutil.move(os.path.join(self.directory, str(step)), target)

    def restore(self, like_state: Any, like_key: jax.Array) -> tuple[int, Any, jax.Array, dict]:
        """Restores the newest usable checkpoint into the structure of ``like_state``;
        unusable newer ones are set aside (see the module docstring)."""
        steps = sorted(self._manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        like = {"state": like_state, "root_key": jax.random.key_data(like_key)}
        # onto ``sharding`` (else the first local device), whatever topology saved them
        where = self.sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
            np.shape(a), a.dtype, sharding=where), like)
        for step in steps:
            try:
                items, meta = self._restore_step(step, abstract)
            except Exception as e:  # noqa: BLE001 -- any failure makes it unusable
                self.skipped.append((step, _reason(e)))
                continue
            if self.skipped:
                if jax.process_index() == 0:
                    for bad, _ in self.skipped:
                        self._set_aside(bad)
                from fedjax_lite.experiment.distributed import sync
                sync("fedjax_lite:checkpoints_set_aside")
                self._manager.close()
                self._manager = self._open(create=False)
            key = jax.random.wrap_key_data(items["root_key"])
            return step, items["state"], key, meta
        raise CheckpointError(f"no usable checkpoint in {self.directory}: " + "; ".join(
            f"round {s}: {why}" for s, why in self.skipped))

    def close(self) -> None:
        self._manager.close()
