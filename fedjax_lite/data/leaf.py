"""LEAF-format federated data (Caldas et al., "LEAF: A Benchmark for Federated Settings",
2018), as LEAF's preprocessing and the FedProx repository (Li et al., MLSys 2020) write it.

A file is one JSON object::

    {"users": [u, ...], "num_samples": [n_u, ...],
     "user_data": {u: {"x": [...], "y": [...]}, ...}}

(other top-level keys, e.g. ``hierarchies``, are ignored). A path is such a file or a
directory of them (every ``*.json`` in it, in name order, merged; a user in two files is
an error naming both). ``users`` / ``num_samples``, where present, must list exactly the
users of ``user_data`` with their example counts. Each user becomes one client, numbered
0..U-1 in the order the training data lists them (:attr:`LeafDataset.users`).

Files are streamed (:mod:`fedjax_lite.data.json_stream`): one user's record is decoded at
a time, so memory holds the converted float32 arrays plus one record, not the JSON text.

The kind of data is detected from the first example's ``x`` (and must hold for all):

* ``numeric`` -- ``x`` entries are (nested) lists of numbers, e.g. FEMNIST (784 pixel
  values, 62 classes) or FedProx's synthetic data (60 values): float32 features of the
  entries' shape; ``y`` integer labels.
* ``shakespeare`` -- ``x`` entries are strings (LEAF: 80 characters), ``y`` entries single
  characters (the next one). Characters map to ids through the fixed :data:`CHARSET`
  (newline, then printable ASCII 32-126): id ``1 + CHARSET.index(c)``; every other
  character is :data:`OOV_ID` = 0, so there are :data:`NUM_CHAR_CLASSES` = 97 classes.
  ``x`` = float32[L] of ids (all strings must share one length L), ``y`` = the next
  character's id.
* ``sent140`` -- ``x`` entries are lists of strings whose last element is the text
  (LEAF: tweet id, date, query, user name, tweet); ``y`` 0/1. Text is lowercased and
  split by :func:`tokenize` into words: maximal runs of Unicode letters, digits and
  underscores, with apostrophes kept inside a word (``don't``); everything else
  (whitespace, punctuation, ``@``, ``#``, URLs' slashes and dots) separates words. The
  vocabulary is the ``vocab_size`` most frequent words of the TRAINING data (ties in
  alphabetical order); ``x`` = float32[vocab_size] bag-of-words counts (words outside
  the vocabulary are not counted), so linear models apply. This reads the training
  files twice (count, then convert).

With a separate test path, the test data uses the training data's kind, character set,
vocabulary and feature shape; a training user missing from it gets an empty test client,
and test users that are not training users are dropped (a warning gives their count).
"""

from __future__ import annotations

import os
import re
import warnings
from collections import Counter
from dataclasses import dataclass
from typing import Any, Iterator

import numpy as np

from fedjax_lite.data.json_stream import JsonStream
from fedjax_lite.data.population import Population, from_ragged

KINDS = ("numeric", "shakespeare", "sent140")
CHARSET = "\n" + "".join(chr(c) for c in range(32, 127))
OOV_ID = 0
NUM_CHAR_CLASSES = len(CHARSET) + 1
DEFAULT_VOCAB_SIZE = 1000
_CHAR_TABLE = np.full(128, OOV_ID, dtype=np.int32)
_CHAR_TABLE[[ord(c) for c in CHARSET]] = np.arange(1, NUM_CHAR_CLASSES)
_WORD = re.compile(r"\w+(?:'\w+)*")


def tokenize(text: str) -> list[str]:
    """Lowercased words of ``text`` (see the module docstring)."""
    return _WORD.findall(text.lower())


def char_ids(text: str) -> np.ndarray:
    """int32 ids of ``text``'s characters in :data:`CHARSET` (others: :data:`OOV_ID`)."""
    codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype=np.uint32)
    return np.where(codes < 128, _CHAR_TABLE[np.minimum(codes, 127)], OOV_ID).astype(np.int32)


@dataclass(frozen=True)
class LeafDataset:
    """A loaded LEAF dataset.

    Attributes:
      train: one client per training user.
      test: the test file's data aligned with ``train`` (row k = user ``users[k]``,
        possibly empty), or None without a test path.
      kind: one of :data:`KINDS`.
      num_classes: classes the labels need: the largest label + 1, and at least 97
        (shakespeare: the character ids) or 2 (sent140).
      users: the training users' names; client id k is ``users[k]``.
      vocabulary: sent140: the words of the bag-of-words columns, in order.
    """
    train: Population
    test: Population | None
    kind: str
    num_classes: int
    users: tuple[str, ...]
    vocabulary: tuple[str, ...] | None = None


def leaf_files(path: str) -> list[str]:
    """``path`` itself, or the ``*.json`` files of the directory ``path`` in name order."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"data file not found: {path}")
    if not os.path.isdir(path):
        return [path]
    files = sorted(os.path.join(path, f) for f in os.listdir(path) if f.endswith(".json"))
    if not files:
        raise ValueError(f"{path}: a directory without .json files (expected LEAF files)")
    return files


def iter_leaf_file(path: str, buffer_size: int = 1 << 20) -> Iterator[tuple[str, dict]]:
    """Yields ``(user, {"x": list, "y": list})`` for every user of one LEAF file, one
    record decoded at a time, and checks ``users`` / ``num_samples`` at the end."""
    meta: dict[str, Any] = {}
    counts: dict[str, int] = {}
    with JsonStream(path, buffer_size) as s:
        for top in s.members("at the start of the file (a LEAF file is a JSON object)"):
            if top != "user_data":
                meta[top] = s.value()
                continue
            for user in s.members("as the value of 'user_data' (an object: user -> data)"):
                record = s.value()
                if user in counts:
                    raise ValueError(f"{path}: user {user!r} appears twice in 'user_data'")
                if (not isinstance(record, dict) or not isinstance(record.get("x"), list)
                        or not isinstance(record.get("y"), list)):
                    raise ValueError(f"{path}: user {user!r}: expected an object with lists "
                                     "'x' and 'y'")
                if len(record["x"]) != len(record["y"]):
                    raise ValueError(f"{path}: user {user!r}: {len(record['x'])} entries in "
                                     f"'x' but {len(record['y'])} in 'y'")
                counts[user] = len(record["y"])
                yield user, record
            meta["user_data"] = True
        s.end()
    _check_meta(path, meta, counts)


def _check_meta(path: str, meta: dict, counts: dict[str, int]) -> None:
    if "user_data" not in meta:
        raise ValueError(f"{path}: no 'user_data' key (a LEAF file holds 'users', "
                         "'num_samples' and 'user_data')")
    users, num = meta.get("users"), meta.get("num_samples")
    if users is None:
        if num is not None:
            raise ValueError(f"{path}: 'num_samples' without 'users'")
        return
    if not isinstance(users, list) or not all(isinstance(u, str) for u in users):
        raise ValueError(f"{path}: 'users' must be a list of user names")
    listed = set(users)
    for u in users:
        if u not in counts:
            raise ValueError(f"{path}: user {u!r} is listed in 'users' but has no entry in "
                             "'user_data'")
    for u in counts:
        if u not in listed:
            raise ValueError(f"{path}: user {u!r} has an entry in 'user_data' but is not "
                             "listed in 'users'")
    if len(listed) != len(users):
        dup = next(u for u in users if users.count(u) > 1)
        raise ValueError(f"{path}: user {dup!r} is listed twice in 'users'")
    if num is None:
        return
    if not isinstance(num, list) or len(num) != len(users):
        raise ValueError(f"{path}: 'num_samples' must be a list as long as 'users' "
                         f"({len(users)})")
    for u, n in zip(users, num):
        if n != counts[u]:
            raise ValueError(f"{path}: user {u!r}: num_samples says {n} but 'user_data' "
                             f"holds {counts[u]} examples")


def _records(path: str, buffer_size: int) -> Iterator[tuple[str, str, dict]]:
    """(file, user, record) over every file of ``path``; a user in two files is an error."""
    seen: dict[str, str] = {}
    for file in leaf_files(path):
        for user, record in iter_leaf_file(file, buffer_size):
            if user in seen:
                raise ValueError(f"user {user!r} appears in both {seen[user]} and {file}")
            seen[user] = file
            yield file, user, record


def detect_kind(x_entry: Any, where: str) -> str:
    """The kind of data whose ``x`` entries look like ``x_entry``."""
    if isinstance(x_entry, str):
        return "shakespeare"
    if isinstance(x_entry, list) and x_entry and isinstance(x_entry[-1], str):
        return "sent140"
    if isinstance(x_entry, list):
        return "numeric"
    raise ValueError(f"{where}: cannot tell the kind of data from x entry {x_entry!r:.60}: "
                     "expected a list of numbers (numeric), a string (Shakespeare) or a "
                     "list of strings ending in the text (Sent140)")


def _labels(y: list, where: str) -> np.ndarray:
    arr = np.asarray(y)
    if arr.size == 0:
        return np.zeros(0, np.int64)
    if arr.ndim != 1 or arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) \
            or not np.all(arr == np.round(arr)):
        raise ValueError(f"{where}: labels 'y' must be integers, got {y[:3]!r}...")
    arr = arr.astype(np.int64)
    if arr.min() < 0:
        j = int(np.argmin(arr))
        raise ValueError(f"{where}: label {arr[j]} of example {j} is negative")
    return arr


class _Converter:
    """Turns one user's record into (x float32[n, ...], y int64[n]) for one kind."""

    def __init__(self, kind: str, vocabulary: dict[str, int] | None, vocab_size: int):
        self.kind, self.vocab, self.vocab_size = kind, vocabulary, vocab_size
        self.shape: tuple[int, ...] | None = None     # features' shape, from the first user

    def __call__(self, file: str, user: str, record: dict) -> tuple[np.ndarray, np.ndarray]:
        where = f"{file}: user {user!r}"
        xs, ys = record["x"], record["y"]
        for j, entry in enumerate(xs):
            if (self.kind == "shakespeare") != isinstance(entry, str) or (
                    self.kind == "sent140") != (isinstance(entry, list) and bool(entry)
                                                and isinstance(entry[-1], str)):
                raise ValueError(f"{where}: x entry {j} ({entry!r:.40}) does not look like "
                                 f"the {self.kind} data detected from the first example")
        if self.kind == "shakespeare":
            x, y = self._chars(xs, ys, where)
        elif self.kind == "sent140":
            x, y = self._words(xs, where), _labels(ys, where)
        else:
            x, y = self._numbers(xs, where), _labels(ys, where)
        if len(x):
            if self.shape is None:
                self.shape = x.shape[1:]
            elif x.shape[1:] != self.shape:
                raise ValueError(f"{where}: features of shape {x.shape[1:]} differ from the "
                                 f"first user's {self.shape}")
        return x, y

    def _numbers(self, xs: list, where: str) -> np.ndarray:
        try:
            with np.errstate(over="ignore"):         # beyond float32: inf, refused below
                x = np.asarray(xs, dtype=np.float32)
        except (ValueError, TypeError):
            raise ValueError(f"{where}: 'x' must be a list of equal-shaped lists of numbers"
                             ) from None
        if len(x) and x.ndim < 2:
            raise ValueError(f"{where}: each x entry must be a list of numbers")
        bad = ~np.isfinite(x.reshape(len(x), -1)).all(axis=1) if len(x) else np.zeros(0, bool)
        if bad.any():
            raise ValueError(f"{where}: non-finite feature (NaN or inf, or beyond float32) "
                             f"in example {int(np.argmax(bad))}")
        return x

    def _chars(self, xs: list, ys: list, where: str) -> tuple[np.ndarray, np.ndarray]:
        lengths = {len(s) for s in xs}
        if self.shape is not None:
            lengths.add(self.shape[0])
        if len(lengths) > 1:
            j = next((j for j, s in enumerate(xs) if len(s) != len(xs[0])), 0)
            raise ValueError(f"{where}: x strings differ in length ({sorted(lengths)[:4]}; "
                             f"example {j}); every string must have the same length")
        for j, c in enumerate(ys):
            if not isinstance(c, str) or len(c) != 1:
                raise ValueError(f"{where}: y entry {j} ({c!r:.20}) must be one character")
        length = lengths.pop() if lengths else 0
        x = char_ids("".join(xs)).reshape(len(xs), length).astype(np.float32)
        return x, char_ids("".join(ys)).astype(np.int64)

    def _words(self, xs: list, where: str) -> np.ndarray:
        rows, cols = [], []
        for j, entry in enumerate(xs):
            ids = [self.vocab[w] for w in tokenize(entry[-1]) if w in self.vocab]
            rows.extend([j] * len(ids))
            cols.extend(ids)
        flat = np.asarray(rows, np.int64) * self.vocab_size + np.asarray(cols, np.int64)
        counts = np.bincount(flat, minlength=len(xs) * self.vocab_size)
        return counts.reshape(len(xs), self.vocab_size).astype(np.float32)


def build_vocabulary(path: str, vocab_size: int, buffer_size: int = 1 << 20) -> list[str]:
    """The ``vocab_size`` most frequent words of the Sent140-style data at ``path``
    (ties alphabetical)."""
    counts: Counter = Counter()
    for _, _, record in _records(path, buffer_size):
        for entry in record["x"]:
            if isinstance(entry, list) and entry and isinstance(entry[-1], str):
                counts.update(tokenize(entry[-1]))
    return sorted(counts, key=lambda w: (-counts[w], w))[:vocab_size]


def _first_x(path: str, buffer_size: int) -> tuple[Any, str]:
    for file, user, record in _records(path, buffer_size):
        if record["x"]:
            return record["x"][0], f"{file}: user {user!r}"
    raise ValueError(f"{path}: no user has any example")


def _read(path: str, convert: _Converter, buffer_size: int):
    names, xs, ys = [], [], []
    for file, user, record in _records(path, buffer_size):
        x, y = convert(file, user, record)
        names.append(user)
        xs.append(x)
        ys.append(y)
    return names, xs, ys


def _shaped(xs: list, shape: tuple[int, ...]) -> list:
    return [x if len(x) else np.zeros((0,) + shape, np.float32) for x in xs]


def load_leaf(path: str, test_path: str | None = None, *, num_classes: int | None = None,
              vocab_size: int = DEFAULT_VOCAB_SIZE,
              buffer_size: int = 1 << 20) -> LeafDataset:
    """Loads LEAF-format training data (and test data aligned with it).

    Args:
      path: a LEAF JSON file or a directory of them (the training data).
      test_path: the same for the test data, or None.
      num_classes: if given, every label must be below it.
      vocab_size: sent140: the bag-of-words vocabulary's size.
      buffer_size: characters read at a time (the window grows to hold one record).

    Raises:
      ValueError naming the file (line:column for malformed JSON) and user.
    """
    if vocab_size < 1:
        raise ValueError(f"vocab_size={vocab_size} must be positive")
    kind = detect_kind(*_first_x(path, buffer_size))
    vocabulary = None
    if kind == "sent140":
        vocabulary = build_vocabulary(path, vocab_size, buffer_size)
    convert = _Converter(kind, None if vocabulary is None else
                         {w: i for i, w in enumerate(vocabulary)}, vocab_size)
    names, xs, ys = _read(path, convert, buffer_size)
    for u, y in zip(names, ys):
        if not len(y):
            raise ValueError(f"{path}: training user {u!r} has no examples")
    test_xs = test_ys = None
    if test_path is not None:
        test_names, txs, tys = _read(test_path, convert, buffer_size)
        by_user = {u: (x, y) for u, x, y in zip(test_names, txs, tys)}
        known = set(names)
        dropped = [u for u in test_names if u not in known]
        if dropped:
            warnings.warn(f"{test_path}: {len(dropped)} test user(s) that are not in the "
                          f"training data dropped (e.g. {dropped[0]!r})", stacklevel=2)
        empty = (np.zeros((0,), np.float32), np.zeros(0, np.int64))
        test_xs = [by_user.get(u, empty)[0] for u in names]
        test_ys = [by_user.get(u, empty)[1] for u in names]
    shape = convert.shape or ()
    largest = max((int(y.max()) for y in ys + (test_ys or []) if len(y)), default=0)
    needed = max({"shakespeare": NUM_CHAR_CLASSES, "sent140": 2}.get(kind, 1), largest + 1)
    if num_classes is not None:
        for file, yy in ((path, ys), (test_path, test_ys or [])):
            for u, y in zip(names, yy):
                if len(y) and y.max() >= num_classes:
                    j = int(np.argmax(y >= num_classes))
                    raise ValueError(f"{file}: user {u!r}: label {y[j]} of example {j} is "
                                     f"out of range, expected [0, {num_classes})")
    train = from_ragged(_shaped(xs, shape), ys, num_classes=num_classes, source=path)
    test = None
    if test_xs is not None:
        test = from_ragged(_shaped(test_xs, shape), test_ys, num_classes=num_classes,
                           allow_empty=True, source=test_path)
    return LeafDataset(train, test, kind, needed, tuple(names),
                       None if vocabulary is None else tuple(vocabulary))
