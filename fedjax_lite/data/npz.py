"""Bring-your-own federated data from .npz files with arrays ``x``, ``y``, ``client``."""

from __future__ import annotations

import os
import zipfile

import numpy as np

from fedjax_lite.data.population import Population, from_flat


def load_npz(path: str, *, num_classes: int | None = None,
             allow_empty: bool = False, require_client: bool = True) -> Population:
    """Loads ``x`` (N, ...) float, ``y`` (N,) int and ``client`` (N,) int client ids.

    A test file may omit ``client`` (``require_client=False``): all its examples then
    form one client. Every problem is reported with the file's path.
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        with np.load(path, allow_pickle=False) as f:
            arrays = {k: f[k] for k in f.files}
    except (zipfile.BadZipFile, ValueError, OSError) as e:
        raise ValueError(f"{path}: not a readable .npz file ({e})") from None
    needed = ["x", "y"] + (["client"] if require_client else [])
    missing = [k for k in needed if k not in arrays]
    if missing:
        raise ValueError(f"{path}: missing array(s) {missing}; expected 'x' (N, d) float, "
                         f"'y' (N,) int, 'client' (N,) int; found {sorted(arrays)}")
    x, y = arrays["x"], arrays["y"]
    if x.ndim < 2:
        raise ValueError(f"{path}: 'x' must have shape (N, d), got {x.shape}")
    client = arrays.get("client", np.zeros(len(y), dtype=np.int64))
    return from_flat(x, y, client, num_classes=num_classes, allow_empty=allow_empty,
                     source=path)
