"""Prepared populations on disk: ``.npy`` files read through memory maps (``data.storage:
mmap``), for populations larger than RAM.

A prepared folder holds ``train/`` and ``test/``, each with ``x.npy`` (float32[K, N, ...]),
``y.npy`` (int32[K, N]), ``n.npy`` (int32[K]) and ``client_ids.npy`` (int64[K]), and
``prepared.json``: the format version, the shapes, and the *fingerprint* -- the resolved
data config (with its seed) the files were made from, so a run never silently trains on
another dataset's files. ``fedjax-lite prepare`` writes one from a config; the runner
writes one into ``OUT/prepared`` on a first mmap run; :class:`PreparedWriter` fills one a
block of clients at a time, so a population never has to fit in memory whole.

Reading: :func:`open_prepared` returns :class:`Population` objects whose ``x`` and ``y``
are :class:`MappedArray` views: indexing one with client rows reads just those rows from
the file, so the process holds a cohort, never the population.
"""

from __future__ import annotations

import json
import os
import shutil
import numpy as np

from fedjax_lite.data.population import Population

FORMAT = 1
ARRAYS = ("x", "y", "n", "client_ids")
DTYPES = {"x": np.float32, "y": np.int32, "n": np.int32, "client_ids": np.int64}


class MappedArray:
    """A read-only ``.npy`` array on disk whose rows are read on demand.

    ``a[rows]`` (an int, a slice or an integer array over the leading axis) reads just
    those rows with ``os.preadv`` -- consecutive rows in one call -- into a fresh array.
    Deliberately not a memory map: pages a map faults in (with the kernel's read-ahead
    around every row) count as the process's resident memory for as long as the map
    lives, about 1.6 MB per random row here; read this way the file's pages stay in the
    kernel's page cache, which memory pressure can always drop."""

    def __init__(self, path: str):
        self.path = path
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            read = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                    else np.lib.format.read_array_header_2_0)
            shape, fortran, dtype = read(f)
            self.offset = f.tell()
        if fortran:
            raise ValueError(f"{path}: Fortran-ordered arrays are not supported")
        self.shape, self.dtype, self.ndim = tuple(shape), np.dtype(dtype), len(shape)
        self.row_bytes = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, index) -> np.ndarray:
        K = self.shape[0]
        if isinstance(index, slice):
            rows = np.arange(*index.indices(K))
        else:
            rows = np.asarray(index)
            if rows.ndim == 0:
                return self[rows.reshape(1)][0]
            if not np.issubdtype(rows.dtype, np.integer):
                raise IndexError(f"{self.path}: rows must be integers, got {rows.dtype}")
            rows = rows.reshape(-1)
        if rows.size and (rows.min() < 0 or rows.max() >= K):
            raise IndexError(f"{self.path}: rows outside [0, {K})")
        out = np.empty((len(rows),) + self.shape[1:], self.dtype)
        flat = out.reshape(len(rows), -1).view(np.uint8).reshape(len(rows), self.row_bytes)
        breaks = np.flatnonzero(np.diff(rows) != 1) + 1     # runs of consecutive rows
        fd = os.open(self.path, os.O_RDONLY)
        try:
            for lo, hi in zip(np.r_[0, breaks], np.r_[breaks, len(rows)]):
                view = memoryview(flat[lo:hi]).cast("B")
                pos, at = 0, self.offset + int(rows[lo]) * self.row_bytes
                while pos < len(view):
                    got = os.preadv(fd, [view[pos:]], at + pos)
                    if got <= 0:
                        raise OSError(f"{self.path}: file ends before row {rows[hi - 1]}")
                    pos += got
        finally:
            os.close(fd)
        return out

    def __array__(self, dtype=None, copy=None):
        out = self[:]
        return out if dtype is None else out.astype(dtype)

    @property
    def nbytes(self) -> int:
        return self.shape[0] * self.row_bytes


def _fingerprint_text(fingerprint: dict) -> str:
    return json.dumps(fingerprint, sort_keys=True, default=str)


class PreparedWriter:
    """Writes one split (``train`` or ``test``) of a prepared folder block by block.

    ``PreparedWriter(folder, split, num_clients, width, feature_shape)``, then
    ``write(start, x, y, n, client_ids)`` for consecutive blocks of clients, then
    ``close()``. Memory: one block (the blocks are written with ``os.pwrite``, not
    through a memory map, whose dirty pages would count as resident memory)."""

    def __init__(self, folder: str, split: str, num_clients: int, width: int,
                 feature_shape: tuple[int, ...]):
        self.dir = os.path.join(folder, split)
        os.makedirs(self.dir, exist_ok=True)
        shapes = {"x": (num_clients, width, *feature_shape), "y": (num_clients, width),
                  "n": (num_clients,), "client_ids": (num_clients,)}
        self.files = {}
        for k in ARRAYS:
            path = os.path.join(self.dir, f"{k}.npy")
            with open(path, "wb") as f:
                np.lib.format.write_array_header_2_0(f, {
                    "descr": np.lib.format.dtype_to_descr(np.dtype(DTYPES[k])),
                    "fortran_order": False, "shape": shapes[k]})
                offset = f.tell()
                row = int(np.prod(shapes[k][1:], dtype=np.int64)) * np.dtype(
                    DTYPES[k]).itemsize
                f.truncate(offset + row * num_clients)
            self.files[k] = (os.open(path, os.O_WRONLY), offset, row, shapes[k][1:])
        self.num_clients, self.filled = num_clients, 0

    def write(self, start: int, x, y, n, client_ids) -> None:
        stop = start + len(n)
        if start != self.filled or stop > self.num_clients:
            raise ValueError(f"{self.dir}: block [{start}, {stop}) is not the next block "
                             f"(filled up to {self.filled} of {self.num_clients})")
        for k, v in zip(ARRAYS, (x, y, n, client_ids)):
            fd, offset, row, trailing = self.files[k]
            block = np.ascontiguousarray(v, dtype=DTYPES[k])
            if block.shape != (stop - start, *trailing):
                raise ValueError(f"{self.dir}: {k} block of shape {block.shape}, expected "
                                 f"{(stop - start, *trailing)}")
            view, pos = memoryview(block.reshape(-1).view(np.uint8)), 0
            while pos < len(view):
                pos += os.pwrite(fd, view[pos:], offset + start * row + pos)
        self.filled = stop

    def close(self) -> None:
        if self.filled != self.num_clients:
            raise ValueError(f"{self.dir}: only {self.filled} of {self.num_clients} "
                             "clients written")
        for fd, *_ in self.files.values():
            os.fsync(fd)
            os.close(fd)
        self.files = {}


def write_meta(folder: str, fingerprint: dict) -> None:
    """Finishes a prepared folder: ``prepared.json`` is written last (atomically), so a
    folder without it is an unfinished one and is never read."""
    meta = {"format": FORMAT, "fingerprint": fingerprint,
            "splits": {s: {k: list(MappedArray(os.path.join(folder, s, f"{k}.npy")).shape)
                           for k in ARRAYS} for s in ("train", "test")}}
    tmp = os.path.join(folder, "prepared.json.tmp")
    with open(tmp, "w") as f:
        json.dump(meta, f, indent=1, default=str)
    os.replace(tmp, os.path.join(folder, "prepared.json"))


def write_prepared(folder: str, train: Population, test: Population,
                   fingerprint: dict, block: int = 4096) -> None:
    """Writes ``train`` and ``test`` into ``folder`` (replacing an unfinished folder)."""
    if os.path.exists(os.path.join(folder, "prepared.json")):
        os.remove(os.path.join(folder, "prepared.json"))
    for name, pop in (("train", train), ("test", test)):
        if os.path.isdir(os.path.join(folder, name)):
            shutil.rmtree(os.path.join(folder, name))
        w = PreparedWriter(folder, name, pop.num_clients, pop.max_examples,
                           pop.feature_shape)
        for s in range(0, pop.num_clients, block):
            sl = slice(s, s + block)
            w.write(s, pop.x[sl], pop.y[sl], pop.n[sl], pop.client_ids[sl])
        w.close()
    write_meta(folder, fingerprint)


def read_meta(folder: str) -> dict | None:
    """``prepared.json`` of ``folder``, or None when the folder is absent/unfinished."""
    path = os.path.join(folder, "prepared.json")
    if not os.path.isfile(path):
        return None
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(f"{path}: unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{path}: not a prepared folder of format {FORMAT}")
    return meta


def fingerprint_mismatch(meta: dict, fingerprint: dict) -> str | None:
    """None if ``meta`` was prepared from ``fingerprint``; else what differs."""
    have = json.loads(_fingerprint_text(meta.get("fingerprint", {})))
    want = json.loads(_fingerprint_text(fingerprint))
    if have == want:
        return None
    keys = sorted(set(have) | set(want))
    diff = [f"{k}: prepared {have.get(k)!r}, config {want.get(k)!r}" for k in keys
            if have.get(k) != want.get(k)]
    return "; ".join(diff) or "different data"


def open_prepared(folder: str, fingerprint: dict | None = None
                  ) -> tuple[Population, Population]:
    """(train, test) of a prepared folder, ``x``/``y`` memory-mapped (n and ids in RAM).

    Raises ValueError (naming the folder) for a missing/unfinished folder, or -- when
    ``fingerprint`` is given -- one prepared from other data."""
    meta = read_meta(folder)
    if meta is None:
        raise ValueError(f"{folder}: not a prepared folder (no prepared.json; make one "
                         "with `fedjax-lite prepare CONFIG --out DIR`)")
    if fingerprint is not None and (why := fingerprint_mismatch(meta, fingerprint)):
        raise ValueError(f"{folder} was prepared from other data ({why}); prepare it "
                         "again or point data.prepared elsewhere")
    out = []
    for split in ("train", "test"):
        d = os.path.join(folder, split)
        try:
            x, y = (MappedArray(os.path.join(d, f"{k}.npy")) for k in ("x", "y"))
            n = np.load(os.path.join(d, "n.npy"))
            ids = np.load(os.path.join(d, "client_ids.npy"))
        except (OSError, ValueError) as e:
            raise ValueError(f"{d}: unreadable prepared arrays ({e})") from None
        K = len(n)
        if x.shape[:2] != y.shape or y.shape[0] != K or len(ids) != K:
            raise ValueError(f"{d}: inconsistent shapes x {x.shape}, y {y.shape}, "
                             f"n {n.shape}, client_ids {ids.shape}")
        if K and (n.min() < 0 or n.max() > x.shape[1]):
            raise ValueError(f"{d}: example counts outside [0, {x.shape[1]}]")
        out.append(Population(x, y, n.astype(np.int32), ids.astype(np.int64)))
    return out[0], out[1]


def check_labels(pop: Population, num_classes: int, source: str,
                 block: int = 65536) -> None:
    """ValueError naming the client and example of the first real label outside
    [0, num_classes) (read ``block`` clients at a time)."""
    for s in range(0, pop.num_clients, block):
        y = np.asarray(pop.y[s:s + block])
        real = np.arange(y.shape[1])[None, :] < pop.n[s:s + block, None]
        bad = real & ((y < 0) | (y >= num_classes))
        if bad.any():
            k, j = np.argwhere(bad)[0]
            raise ValueError(f"{source}: client {pop.client_ids[s + k]}: label "
                             f"{y[k, j]} of example {j} is out of range, expected "
                             f"[0, {num_classes})")


def population_bytes(pop: Population) -> int:
    """Bytes of a population's arrays (what the device would hold)."""
    return sum(int(np.prod(a.shape)) * np.dtype(a.dtype).itemsize
               for a in pop.arrays().values())


__all__ = ["MappedArray", "PreparedWriter", "check_labels", "fingerprint_mismatch", "open_prepared",
           "population_bytes", "read_meta", "write_meta", "write_prepared"]

