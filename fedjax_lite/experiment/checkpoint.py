"""Checkpoints with orbax-checkpoint (never pickle): server state, root key, round.

Layout: ``DIR/checkpoints/<round>/`` managed by ``orbax.checkpoint.CheckpointManager``,
which writes to a temporary folder and renames it when complete, so a process killed
mid-save leaves the previous checkpoint as the latest one.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, keep: int = 2):
        self.directory = os.path.abspath(directory)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=False))

    def latest_round(self) -> int | None:
        return self._manager.latest_step()

    def save(self, round_num: int, state: Any, root_key: jax.Array, meta: dict) -> None:
        items = {"state": state, "root_key": jax.random.key_data(root_key)}
        self._manager.save(round_num, args=ocp.args.Composite(
            state=ocp.args.StandardSave(items), meta=ocp.args.JsonSave(meta)), force=True)
        self._manager.wait_until_finished()

    def restore(self, like_state: Any, like_key: jax.Array) -> tuple[int, Any, jax.Array, dict]:
        """Restores the latest checkpoint into the structure of ``like_state``."""
        step = self._manager.latest_step()
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        like = {"state": like_state, "root_key": jax.random.key_data(like_key)}
        abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(np.shape(a), a.dtype), like)
        out = self._manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
        items = out["state"]
        key = jax.random.wrap_key_data(items["root_key"])
        return step, items["state"], key, dict(out["meta"])

    def close(self) -> None:
        self._manager.close()
