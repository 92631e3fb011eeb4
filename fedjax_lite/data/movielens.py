"""MovieLens ratings, read from a directory as GroupLens distributes it (NumPy only).

The layouts, as each archive's README describes them (https://grouplens.org/datasets/movielens/):

  ml-100k   ``u.data``: ``user id <TAB> item id <TAB> rating <TAB> timestamp``, whole stars
            1..5; predefined splits ``u1.base``/``u1.test`` .. ``u5`` (80/20, the five test
            sets disjoint) and ``ua``/``ub`` (exactly 10 test ratings per user), same layout.
  ml-1m     ``ratings.dat``: ``UserID::MovieID::Rating::Timestamp``, whole stars 1..5.
  ml-10m    ``ratings.dat`` beside ``tags.dat``: the same layout, half stars 0.5..5.
  ml-latest, ml-latest-small (and ml-20m / 25m / 32m): ``ratings.csv`` with the header
            ``userId,movieId,rating,timestamp``, half stars 0.5..5.

Timestamps are seconds since 1970-01-01 UTC. The files may not be redistributed (their
licence), so nothing here ships or downloads them: point ``path`` at your own copy.

Parsing is vectorized: a file is read in blocks of whole lines, every separator and newline
is located with NumPy, and each field is decoded a character column at a time over all the
block's lines at once (no Python loop over lines): about 0.4 s per million lines on one
shared CPU core.
Every problem is reported as ``file:line: what is wrong`` (1-based line numbers).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from fedjax_lite.data.ratings import FlatRatings, RatingsSplit, find_duplicate
from fedjax_lite.data.ratings_split import SPLIT_KINDS, ratings_from_train_test, split_ratings

ML100K_SPLITS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub")
_FIELDS = ("user id", "item id", "rating", "timestamp")


@dataclass(frozen=True)
class MovieLensFormat:
    """One file layout: separator, optional header line, rating scale and step."""

    name: str
    sep: bytes
    header: bytes | None
    scale: tuple[float, float]
    step: float


FORMATS = {
    "ml-100k": MovieLensFormat("ml-100k", b"\t", None, (1.0, 5.0), 1.0),
    "ml-1m": MovieLensFormat("ml-1m", b"::", None, (1.0, 5.0), 1.0),
    "ml-10m": MovieLensFormat("ml-10m", b"::", None, (0.5, 5.0), 0.5),
    "ml-latest": MovieLensFormat("ml-latest", b",", b"userId,movieId,rating,timestamp",
                                 (0.5, 5.0), 0.5),
}
_EXPECTED = ("u.data (ml-100k, or its u1.base/u1.test .. ub splits), ratings.dat (ml-1m, "
             "ml-10m) or ratings.csv (ml-latest, ml-latest-small, ml-20m/25m/32m)")


# --------------------------------------------------------------------------- parsing


def _numbers(a: np.ndarray, start: np.ndarray, end: np.ndarray,
             decimal: bool) -> tuple[np.ndarray, np.ndarray]:
    """Decodes the fields ``a[start:end]`` of every line at once, one character column
    per step. Returns (values, ok): int64 for integers, float64 for decimals (optional
    sign, at most one '.')."""
    length = end - start
    ok = (length > 0) & (length <= 18)
    neg = np.zeros(len(start), bool)
    if decimal:
        neg = (a[np.minimum(start, len(a) - 1)] == 45) & (length > 1)  # '-'
    begin = start + neg
    val = np.zeros(len(start), np.int64)
    frac = np.zeros(len(start), np.int64)
    dots = np.zeros(len(start), np.int64)
    digits = np.zeros(len(start), np.int64)
    for j in range(int(np.minimum(length, 19).max()) if len(start) else 0):
        pos = begin + j
        valid = pos < end
        c = a[np.minimum(pos, len(a) - 1)].astype(np.int64)
        digit = valid & (c >= 48) & (c <= 57)
        dot = valid & (c == 46)
        ok &= ~valid | digit | (dot if decimal else False)
        val = np.where(digit & ok, val * 10 + (c - 48), val)
        frac += digit & (dots > 0)
        digits += digit
        dots += dot
    ok &= (digits > 0) & (dots <= 1)
    if not decimal:
        return val, ok
    out = val / 10.0 ** frac
    return np.where(neg, -out, out), ok


def _line_text(a: np.ndarray, start: int, end: int, sep: bytes = b"\t") -> str:
    """Bytes a[start:end] as text for a message ('::' restored where it became a tab)."""
    text = bytes(a[start:end]).replace(b"\t", sep).decode("utf-8", errors="replace")
    return text if len(text) <= 80 else text[:77] + "..."


def _parse_block(data: bytes, line0: int, fmt: MovieLensFormat, path: str):
    """Parses whole lines (``data`` ends with a newline) whose first line is ``line0``.
    Returns (user, item, rating, timestamp, blank line numbers)."""
    sep_name = {b"\t": "tabs", b"::": "'::'", b",": "commas"}.get(fmt.sep, repr(fmt.sep))
    if len(fmt.sep) > 1:  # one byte per separator, so fields are delimited by one byte
        data = data.replace(fmt.sep, b"\t")
    sep = 9 if len(fmt.sep) > 1 else fmt.sep[0]
    a = np.frombuffer(data, np.uint8)
    nl = np.flatnonzero(a == 10)
    starts = np.r_[0, nl[:-1] + 1].astype(np.int64)
    ends = nl.astype(np.int64)
    cr = (ends > starts) & (a[np.maximum(ends - 1, 0)] == 13)  # CRLF line endings
    ends[cr] -= 1
    lines = line0 + np.arange(len(nl))
    blank = ends == starts
    seps = np.flatnonzero(a == sep)
    nsep = np.bincount(np.searchsorted(nl, seps), minlength=len(nl))
    bad = (nsep != 3) & ~blank
    if bad.any():
        j = int(np.argmax(bad))
        raise ValueError(f"{path}:{lines[j]}: expected 4 fields (user, item, rating, "
                         f"timestamp) separated by {sep_name}, found {nsep[j] + 1}: "
                         f"{_line_text(a, starts[j], ends[j], fmt.sep)!r}")
    keep = ~blank
    starts, ends, lines = starts[keep], ends[keep], lines[keep]
    seps = seps.reshape(-1, 3)
    bounds = [(starts, seps[:, 0]), (seps[:, 0] + 1, seps[:, 1]),
              (seps[:, 1] + 1, seps[:, 2]), (seps[:, 2] + 1, ends)]
    values = []
    for k, (s, e) in enumerate(bounds):
        v, ok = _numbers(a, s, e, decimal=k == 2)
        if not ok.all():
            j = int(np.argmin(ok))
            what = "a number" if k == 2 else "a non-negative integer"
            raise ValueError(f"{path}:{lines[j]}: {_FIELDS[k]} "
                             f"{_line_text(a, s[j], e[j], fmt.sep)!r} is not {what}: "
                             f"{_line_text(a, starts[j], ends[j], fmt.sep)!r}")
        values.append(v)
    user, item, rating, ts = values
    lo, hi = fmt.scale
    off = (rating < lo) | (rating > hi) | (np.abs(rating / fmt.step - np.round(
        rating / fmt.step)) > 1e-9)
    if off.any():
        j = int(np.argmax(off))
        s, e = bounds[2][0][j], bounds[2][1][j]
        raise ValueError(f"{path}:{lines[j]}: rating {_line_text(a, s, e)} is outside the "
                         f"file's scale: {fmt.name} allows {lo:g} to {hi:g} in steps of "
                         f"{fmt.step:g}")
    return user, item, rating.astype(np.float32), ts, line0 + np.flatnonzero(blank)


def read_ratings_file(path: str, fmt: str | MovieLensFormat, *, chunk_bytes: int = 1 << 25,
                      check_duplicates: bool = True) -> FlatRatings:
    """Reads one ratings file of layout ``fmt`` (a name in ``FORMATS`` or a
    :class:`MovieLensFormat`), in blocks of about ``chunk_bytes``. Blank lines are skipped.

    Raises:
      FileNotFoundError naming the path; ValueError ``path:line: problem`` for a missing or
      wrong header, a malformed line, a rating outside the scale or a repeated
      (user, item) pair.
    """
    flat, lines = _read(path, fmt, chunk_bytes)
    if check_duplicates:
        dup = find_duplicate(flat.user, flat.item)
        if dup is not None:
            la, lb = (_row_line(r, lines) for r in dup)
            raise ValueError(f"{flat.source}:{lb}: user {flat.user[dup[0]]} rated item "
                             f"{flat.item[dup[0]]} again (first at line {la}); each "
                             "(user, item) pair must appear once")
    return flat


def _read(path: str, fmt: str | MovieLensFormat,
          chunk_bytes: int = 1 << 25) -> tuple[FlatRatings, tuple[int, np.ndarray]]:
    """(ratings, (line of the first data row, sorted numbers of the blank lines skipped))."""
    fmt = FORMATS[fmt] if isinstance(fmt, str) else fmt
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"ratings file not found: {path}")
    parts, blanks = [], []
    line0, carry, header_pending, at_start = 1, b"", fmt.header is not None, True
    with open(path, "rb") as fh:
        while True:
            block = fh.read(chunk_bytes)
            data = carry + block
            if block:
                cut = data.rfind(b"\n") + 1
                if cut == 0:  # no complete line yet
                    carry = data
                    continue
                data, carry = data[:cut], data[cut:]
            elif not data:
                break
            elif not data.endswith(b"\n"):
                data, carry = data + b"\n", b""
            if at_start:  # a UTF-8 byte order mark, as some editors write
                data, at_start = data.removeprefix(b"\xef\xbb\xbf"), False
            if header_pending:
                first, _, data = data.partition(b"\n")
                found = first.rstrip(b"\r")
                if found != fmt.header:
                    raise ValueError(
                        f"{path}:1: expected the header {fmt.header.decode()!r} ({fmt.name}), "
                        f"found {found[:80].decode('utf-8', errors='replace')!r}")
                header_pending, line0 = False, 2
            if data:
                *arrays, blank = _parse_block(data, line0, fmt, path)
                parts.append(arrays)
                blanks.append(blank)
                line0 += data.count(b"\n")
            if not block:
                break
    if not sum(len(p[0]) for p in parts):
        raise ValueError(f"{path}: no ratings found (expected lines of user, item, rating, "
                         f"timestamp{' after the header' if fmt.header else ''})")
    user, item, rating, ts = (np.concatenate(c) for c in zip(*parts))
    flat = FlatRatings(user, item, rating, fmt.scale, ts, path)
    return flat, (2 if fmt.header else 1, np.concatenate(blanks))


def _row_line(row: int, lines: tuple[int, np.ndarray]) -> int:
    """The file line of data row ``row``, given (first data line, sorted blank lines):
    the smallest L with L - first + 1 - #blanks in [first, L] = row + 1."""
    (first, blank_lines), skipped = lines, 0
    while True:
        now = int(np.searchsorted(blank_lines, first + row + skipped, side="right"))
        if now == skipped:
            return first + row + skipped
        skipped = now


# --------------------------------------------------------------------------- layouts


def detect_movielens(path: str) -> tuple[MovieLensFormat, str | None]:
    """(format, all-ratings file) of a MovieLens directory; the file is None for an
    ml-100k directory that holds only predefined splits."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"MovieLens directory not found: {path}")
    if not os.path.isdir(path):
        raise ValueError(f"{path} is a file; expected the directory GroupLens distributes, "
                         f"holding {_EXPECTED}")
    names = sorted(os.listdir(path))
    found = [f for f in ("u.data", "ratings.dat", "ratings.csv") if f in names]
    if not found and any(f"{s}.base" in names for s in ML100K_SPLITS):
        return FORMATS["ml-100k"], None
    if len(found) > 1:
        raise ValueError(f"{path}: ambiguous MovieLens layout, found {found}; expected one of "
                         f"{_EXPECTED}")
    if not found:
        inner = [d for d in names if os.path.isdir(os.path.join(path, d)) and any(
            f in os.listdir(os.path.join(path, d)) for f in ("u.data", "ratings.dat",
                                                              "ratings.csv"))]
        hint = f"; did you mean {os.path.join(path, inner[0])}?" if inner else ""
        shown = names[:12] + (["..."] if len(names) > 12 else [])
        raise ValueError(f"{path}: unknown MovieLens layout: found {shown or 'nothing'}; "
                         f"expected {_EXPECTED}{hint}")
    f = found[0]
    if f == "u.data":
        fmt = FORMATS["ml-100k"]
    elif f == "ratings.dat":
        fmt = FORMATS["ml-10m" if "tags.dat" in names else "ml-1m"]
    else:
        fmt = FORMATS["ml-latest"]
    return fmt, os.path.join(path, f)


def read_movielens(path: str) -> FlatRatings:
    """All ratings of a MovieLens directory (u.data, ratings.dat or ratings.csv)."""
    fmt, file = detect_movielens(path)
    if file is None:
        raise FileNotFoundError(f"{os.path.join(os.fspath(path), 'u.data')} not found (this "
                                "ml-100k directory only holds predefined splits)")
    return read_ratings_file(file, fmt)


def load_movielens(path: str, split: str = "u1", test_fraction: float = 0.2, seed: int = 0,
                   *, heldout_users: float = 0.0,
                   max_user_ratings: int | None = None) -> RatingsSplit:
    """Loads a MovieLens directory as a :class:`RatingsSplit`.

    Args:
      path: the directory (ml-100k, ml-1m, ml-10m, ml-latest, ml-latest-small, ...).
      split: one of ml-100k's predefined splits 'u1'..'u5', 'ua', 'ub' (its
        ``<split>.base`` / ``<split>.test`` files), or 'random' | 'temporal' |
        'leave_one_out' applied per user to all ratings (see ``split_ratings``).
      test_fraction, seed, heldout_users, max_user_ratings: as in ``split_ratings``
        (``heldout_users`` also applies to predefined splits; ``test_fraction`` does not).
    """
    if split not in ML100K_SPLITS + SPLIT_KINDS:
        raise ValueError(f"unknown MovieLens split {split!r}; expected one of "
                         f"{', '.join(ML100K_SPLITS)} (ml-100k's predefined splits) or "
                         f"{', '.join(SPLIT_KINDS)}")
    fmt, file = detect_movielens(path)
    if split in SPLIT_KINDS:
        flat = read_movielens(path)
        return split_ratings(flat, split, test_fraction=test_fraction, seed=seed,
                             heldout_users=heldout_users, max_user_ratings=max_user_ratings,
                             check_duplicates=False)
    if fmt.name != "ml-100k":
        raise ValueError(f"split {split!r} is one of ml-100k's predefined splits, but {path} "
                         f"holds {fmt.name} ratings ({os.path.basename(file)}); use one of "
                         f"{', '.join(SPLIT_KINDS)}")
    base, test = (os.path.join(os.fspath(path), f"{split}.{ext}") for ext in ("base", "test"))
    for f in (base, test):
        if not os.path.isfile(f):
            raise FileNotFoundError(f"ml-100k split file not found: {f}")
    (train, tr_lines), (test_part, te_lines) = _read(base, fmt), _read(test, fmt)
    both_user = np.r_[train.user, test_part.user]
    both_item = np.r_[train.item, test_part.item]
    dup = find_duplicate(both_user, both_item)
    if dup is not None:
        a, b = dup
        where = [(base, _row_line(r, tr_lines)) if r < train.num_ratings else
                 (test, _row_line(r - train.num_ratings, te_lines)) for r in (a, b)]
        raise ValueError(f"{where[1][0]}:{where[1][1]}: user {both_user[a]} rated item "
                         f"{both_item[a]} again (first at {where[0][0]}:{where[0][1]}); "
                         f"each (user, item) pair must appear once, and {split}.base and "
                         f"{split}.test must be disjoint")
    return ratings_from_train_test(train, test_part, heldout_users=heldout_users, seed=seed,
                                   check_duplicates=False)
