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
"""

from __future__ import annotations

import hashlib
import os
import shutil
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


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
    def __init__(self, directory: str, keep: int = 2, create: bool = True):
        self.directory = os.path.abspath(directory)
        self.keep = keep
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
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), like)
        for step in steps:
            try:
                items, meta = self._restore_step(step, abstract)
            except Exception as e:  # noqa: BLE001 -- any failure makes it unusable
                self.skipped.append((step, _reason(e)))
                continue
            if self.skipped:
                for bad, _ in self.skipped:
                    self._set_aside(bad)
                self._manager.close()
                self._manager = self._open(create=False)
            key = jax.random.wrap_key_data(items["root_key"])
            return step, items["state"], key, meta
        raise CheckpointError(f"no usable checkpoint in {self.directory}: " + "; ".join(
            f"round {s}: {why}" for s, why in self.skipped))

    def close(self) -> None:
        self._manager.close()
