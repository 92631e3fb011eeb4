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
    arrays = _read_arrays(path)
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


def _read_arrays(path: str) -> dict[str, np.ndarray]:
    """The arrays of the .npz file at ``path``; ValueError (one line naming the file) for
    anything that is not a zip archive of plain .npy arrays. Never unpickles: a file that
    is not a zip archive is refused before NumPy would try to read it as a pickle."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    expected = "expected a zip archive of .npy arrays, as numpy.savez writes"
    if os.path.isdir(path):
        raise ValueError(f"{path}: not a readable .npz file: a directory ({expected})")
    if not os.access(path, os.R_OK):
        raise ValueError(f"{path}: not a readable .npz file: permission denied")
    try:
        size = os.path.getsize(path)
        is_zip = size > 0 and zipfile.is_zipfile(path)
    except OSError as e:
        raise ValueError(f"{path}: not a readable .npz file ({_one_line(e)})") from None
    if not is_zip:
        what = ("the file is empty" if size == 0 else
                f"not a zip archive ({size} bytes: another format, or a truncated file)")
        raise ValueError(f"{path}: not a readable .npz file: {what} ({expected})")
    arrays, key = {}, None
    try:
        with np.load(path, allow_pickle=False) as f:
            for key in f.files:
                arrays[key] = f[key]
    except ValueError as e:
        if "pickle" in str(e) or "Object arrays" in str(e):
            raise ValueError(f"{path}: array {key!r} holds Python objects (pickled data), "
                             "which are never loaded; save numeric arrays") from None
        raise ValueError(f"{path}: not a readable .npz file ({_one_line(e)})") from None
    except Exception as e:  # noqa: BLE001 -- zipfile/zlib/EOF/OS errors of a damaged file
        raise ValueError(f"{path}: not a readable .npz file ({type(e).__name__}: "
                         f"{_one_line(e)})") from None
    for k, value in arrays.items():
        if not isinstance(value, np.ndarray):   # a zip member that is not a .npy file
            raise ValueError(f"{path}: not a readable .npz file: member {k!r} is not a "
                             f".npy array ({expected})")
    return arrays


def _one_line(e: BaseException) -> str:
    return " ".join(str(e).split()) or type(e).__name__
