"""Tests for fedjax_lite.data.movielens on tiny files of every layout, written here.

MovieLens itself is never stored in the repository (its licence forbids redistribution):
every file below is generated into pytest's tmp_path.
"""

from __future__ import annotations

import os
import time

import numpy as np
import pytest

from fedjax_lite.data.movielens import (FORMATS, detect_movielens, load_movielens,
                                        read_movielens, read_ratings_file)

# (user, item, rating, timestamp): user 3 has one rating; item 40 is rated once.
ROWS = [(1, 10, 5, 881250949), (1, 20, 3, 881250950), (1, 30, 4, 881250960),
        (2, 10, 2, 891717742), (2, 20, 1, 891717700), (2, 40, 4, 891717800),
        (3, 10, 3, 878887116), (4, 20, 5, 880606923), (4, 30, 2, 880606924),
        (4, 10, 4, 880606925)]
HALF = [(u, i, r - 0.5 * (k % 2), t) for k, (u, i, r, t) in enumerate(ROWS)]


def _lines(rows, sep, fmt_rating=lambda r: f"{r:g}"):
    return [f"{u}{sep}{i}{sep}{fmt_rating(r)}{sep}{t}" for u, i, r, t in rows]


def _write(path, lines, *, header=None, newline="\n", final_newline=True, bom=False):
    text = newline.join(([header] if header else []) + list(lines))
    if final_newline:
        text += newline
    data = text.encode()
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data)
    return str(path)


def ml100k(tmp_path, rows=ROWS, splits=True):
    d = tmp_path / "ml-100k"
    d.mkdir()
    _write(d / "u.data", _lines(rows, "\t"))
    for name in ("u.item", "u.user", "README"):
        (d / name).write_text("")
    if splits:  # u1: a fixed 7 / 3 split of ROWS
        _write(d / "u1.base", _lines([rows[k] for k in (0, 1, 3, 4, 6, 7, 8)], "\t"))
        _write(d / "u1.test", _lines([rows[k] for k in (2, 5, 9)], "\t"))
    return str(d)


def _dat_dir(tmp_path, name, rows, companion):
    """A ``::``-separated ratings.dat release (ml-1m, ml-10m) with its other files."""
    d = tmp_path / name
    d.mkdir()
    _write(d / "ratings.dat", _lines(rows, "::"))
    for other in (companion, "movies.dat"):
        (d / other).write_text("")
    return str(d)


def ml1m(tmp_path, rows=ROWS):
    return _dat_dir(tmp_path, "ml-1m", rows, "users.dat")


def ml10m(tmp_path, rows=HALF):
    return _dat_dir(tmp_path, "ml-10M100K", rows, "tags.dat")


def ml_latest(tmp_path, rows=HALF, **kw):
    d = tmp_path / "ml-latest-small"
    d.mkdir()
    _write(d / "ratings.csv", _lines(rows, ",", lambda r: f"{r:.1f}"),
           header="userId,movieId,rating,timestamp", **kw)
    (d / "movies.csv").write_text("movieId,title,genres\n")
    return str(d)


def _as_rows(flat):
    return sorted(zip(flat.user.tolist(), flat.item.tolist(), flat.rating.tolist(),
                      flat.timestamp.tolist()))


# --------------------------------------------------------------------------- formats


@pytest.mark.parametrize("make, name, rows, scale", [
    (ml100k, "ml-100k", ROWS, (1.0, 5.0)),
    (ml1m, "ml-1m", ROWS, (1.0, 5.0)),
    (ml10m, "ml-10m", HALF, (0.5, 5.0)),
    (ml_latest, "ml-latest", HALF, (0.5, 5.0)),
])
def test_every_layout_round_trips(tmp_path, make, name, rows, scale):
    path = make(tmp_path)
    fmt, file = detect_movielens(path)
    assert fmt.name == name and fmt is FORMATS[name]
    flat = read_movielens(path)
    assert _as_rows(flat) == sorted((u, i, float(r), t) for u, i, r, t in rows)
    assert flat.scale == scale and flat.source == file
    assert flat.user.dtype == np.int64 and flat.rating.dtype == np.float32
    for chunk in (1, 7, 64):  # lines cut across reading blocks
        again = read_ratings_file(file, fmt, chunk_bytes=chunk)
        assert _as_rows(again) == _as_rows(flat)


def test_crlf_bom_blank_lines_and_missing_final_newline(tmp_path):
    lines = _lines(HALF, ",", lambda r: f"{r:.1f}")
    lines.insert(3, "")
    path = ml_latest(tmp_path, rows=[], newline="\r\n", final_newline=False, bom=True)
    _write(tmp_path / "ml-latest-small" / "ratings.csv", lines,
           header="userId,movieId,rating,timestamp", newline="\r\n", final_newline=False,
           bom=True)
    flat = read_movielens(path)
    assert _as_rows(flat) == sorted((u, i, float(r), t) for u, i, r, t in HALF)
    data = _write(tmp_path / "u.data", _lines(ROWS, "\t"), newline="\r\n", bom=True)
    assert _as_rows(read_ratings_file(data, "ml-100k")) == sorted(
        (u, i, float(r), t) for u, i, r, t in ROWS)


def test_parse_speed_one_million_lines(tmp_path):
    """Printed, not asserted: the vectorized parser's throughput."""
    n = 1_000_000
    rng = np.random.default_rng(0)
    u, i = rng.integers(1, 200_000, n), rng.integers(1, 100_000, n)
    r, t = rng.integers(1, 11, n) / 2, rng.integers(10 ** 8, 2 * 10 ** 9, n)
    path = tmp_path / "ratings.csv"
    with open(path, "w") as f:
        f.write("userId,movieId,rating,timestamp\n")
        f.write("\n".join(map(",".join, zip(u.astype(str), i.astype(str), r.astype(str),
                                             t.astype(str)))) + "\n")
    t0 = time.perf_counter()
    flat = read_ratings_file(str(path), "ml-latest", check_duplicates=False)
    t1 = time.perf_counter()
    print(f"\nparsed {n:,} ratings.csv lines ({os.path.getsize(path) / 2**20:.0f} MiB) in "
          f"{t1 - t0:.2f} s")
    np.testing.assert_array_equal(flat.user, u)
    np.testing.assert_array_equal(flat.timestamp, t)
    np.testing.assert_array_equal(flat.rating, r.astype(np.float32))


# --------------------------------------------------------------------------- splits


def test_predefined_u1_split(tmp_path):
    split = load_movielens(ml100k(tmp_path), "u1")
    # u1.base: users 1..4, items 10, 20, 30; u1.test: (1, 30), (2, 40), (4, 10)
    assert split.train.user_ids.tolist() == [1, 2, 3, 4]
    assert split.item_ids.tolist() == [10, 20, 30]
    assert split.train.num_ratings == 7
    assert split.unseen_test_items == 1  # (2, 40): item 40 is never rated in u1.base
    test = {(int(split.train.user_ids[u]), int(split.item_ids[split.test.item[u, j]]))
            for u in range(4) for j in range(split.test.n[u])}
    assert test == {(1, 30), (4, 10)}
    assert split.scale == (1.0, 5.0) and split.train.timestamp is not None


def test_predefined_split_counts_test_users_missing_from_base(tmp_path):
    path = ml100k(tmp_path)
    _write(tmp_path / "ml-100k" / "u2.base", _lines(ROWS[:5], "\t"))
    _write(tmp_path / "ml-100k" / "u2.test", _lines(ROWS[5:], "\t"))
    split = load_movielens(path, "u2")
    assert split.train.user_ids.tolist() == [1, 2]
    assert split.unseen_test_users == 4  # users 3 and 4 have no u2.base rating
    assert split.unseen_test_items == 1  # (2, 40)


@pytest.mark.parametrize("kind", ["random", "temporal", "leave_one_out"])
def test_loader_splits_all_ratings(tmp_path, kind):
    split = load_movielens(ml_latest(tmp_path), kind, test_fraction=0.4, seed=1)
    assert split.train.user_ids.tolist() == [1, 2, 3, 4]
    total = split.train.num_ratings + split.test.num_ratings + split.unseen_test_items
    assert total == len(HALF) and (split.train.n >= 1).all()
    assert split.test.n[2] == 0  # user 3 has a single rating
    if kind == "leave_one_out":  # user 2's latest is item 40 (dropped: rated once)
        assert split.test.n.tolist() == [1, 0, 0, 1] and split.unseen_test_items == 1
        assert split.test.timestamp[0, 0] == 881250960  # user 1's latest


def test_loader_heldout_users(tmp_path):
    split = load_movielens(ml100k(tmp_path), "random", heldout_users=0.5, seed=2)
    held = set() if split.heldout is None else set(split.heldout.user_ids.tolist())
    assert not held & set(split.train.user_ids.tolist())
    assert len(held) + split.train.num_users <= 4


# --------------------------------------------------------------------------- errors


def test_missing_directory_and_file_paths(tmp_path):
    missing = str(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=f"MovieLens directory not found: {missing}"):
        load_movielens(missing)
    path = ml100k(tmp_path, splits=False)
    with pytest.raises(FileNotFoundError, match="ml-100k split file not found: .*u3.base"):
        load_movielens(path, "u3")
    with pytest.raises(ValueError, match="is a file; expected the directory"):
        load_movielens(os.path.join(path, "u.data"))
    with pytest.raises(FileNotFoundError, match="ratings file not found: .*nope.csv"):
        read_ratings_file(str(tmp_path / "nope.csv"), "ml-latest")


def test_unknown_ambiguous_and_nested_layouts(tmp_path):
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "ratings.json").write_text("{}")
    with pytest.raises(ValueError, match=r"unknown MovieLens layout: found \['ratings.json'\]; "
                                         r"expected u.data \(ml-100k.*ratings.csv"):
        load_movielens(str(odd), "random")
    outer = tmp_path / "download"
    outer.mkdir()
    ml1m(outer)
    with pytest.raises(ValueError, match="did you mean .*download/ml-1m"):
        load_movielens(str(outer), "random")
    both = tmp_path / "both"
    both.mkdir()
    (both / "u.data").write_text("1\t2\t3\t4\n")
    (both / "ratings.csv").write_text("userId,movieId,rating,timestamp\n")
    with pytest.raises(ValueError, match="ambiguous MovieLens layout"):
        load_movielens(str(both), "random")


def test_split_names(tmp_path):
    with pytest.raises(ValueError, match="unknown MovieLens split 'u6'; expected one of u1, "
                                         "u2, .*ub .*random, temporal, leave_one_out"):
        load_movielens(str(tmp_path), "u6")
    with pytest.raises(ValueError, match="'u1' is one of ml-100k's predefined splits, but "
                                         ".* holds ml-1m ratings \\(ratings.dat\\)"):
        load_movielens(ml1m(tmp_path), "u1")


@pytest.mark.parametrize("fmt, lines, message", [
    ("ml-100k", ["1\t10\t5\t100", "1\t10\t5"],
     ":2: expected 4 fields .* separated by tabs, found 3: '1\\\\t10\\\\t5'"),
    ("ml-100k", ["1\t10\t5\t100", "", "1\t1x\t5\t3"],
     ":3: item id '1x' is not a non-negative integer"),
    ("ml-100k", ["1\t10\t5\t100", "1\t\t4\t3"], ":2: item id '' is not"),
    ("ml-100k", ["-1\t2\t4\t3"], ":1: user id '-1' is not a non-negative integer"),
    ("ml-100k", ["1\t2\t4\tyesterday"], ":1: timestamp 'yesterday' is not"),
    ("ml-100k", ["1\t2\tfour\t3"], ":1: rating 'four' is not a number"),
    ("ml-100k", ["1\t2\t6\t3"], ":1: rating 6 is outside the file's scale: ml-100k allows 1 "
                                "to 5 in steps of 1"),
    ("ml-100k", ["1\t2\t0\t3"], ":1: rating 0 is outside"),
    ("ml-1m", ["1::2::3::4", "1::3::3.5::4"], ":2: rating 3.5 is outside the file's scale: "
                                             "ml-1m allows 1 to 5 in steps of 1"),
    ("ml-1m", ["1::2:3::4"], ":1: expected 4 fields .* separated by '::', found 3"),
    ("ml-1m", ["1:::2::3::4"], ":1: item id ':2' is not a non-negative integer: "
                               "'1:::2::3::4'"),
    ("ml-latest", ["userId,movieId,rating,timestamp", "1,2,5.5,3"],
     ":2: rating 5.5 is outside the file's scale: ml-latest allows 0.5 to 5 in steps of 0.5"),
    ("ml-latest", ["userId,movieId,rating,timestamp", "1,2,3.7,3"], ":2: rating 3.7 is "),
    ("ml-latest", ["userId,movieId,rating,timestamp", "1,2,-1.0,3"], ":2: rating -1.0 is "),
    ("ml-latest", ["userId,movieId,rating,timestamp", "1,2,3.5.0,3"], ":2: rating '3.5.0'"),
    ("ml-latest", ["userId,movieId,rating,timestamp", "1,2,3.5,3,extra"],
     ":2: expected 4 fields .* separated by commas, found 5"),
    ("ml-latest", ["1,2,3.5,3"], ":1: expected the header 'userId,movieId,rating,timestamp' "
                                 "\\(ml-latest\\), found '1,2,3.5,3'"),
    ("ml-latest", ["user,movie,rating,time", "1,2,3.5,3"], ":1: expected the header"),
    ("ml-latest", ["userId,movieId,rating,timestamp"], ": no ratings found .* after the "
                                                       "header"),
    ("ml-100k", [], ": no ratings found"),
    ("ml-100k", ["1\t10\t5\t100", "", "2\t10\t4\t101", "1\t10\t3\t102"],
     ":4: user 1 rated item 10 again \\(first at line 1\\)"),
])
def test_malformed_files_name_file_and_line(tmp_path, fmt, lines, message):
    path = _write(tmp_path / "data.txt", lines, final_newline=bool(lines))
    with pytest.raises(ValueError, match=f"{path}{message}"):
        read_ratings_file(path, fmt, chunk_bytes=8)  # small blocks: line numbers carry over


def test_base_and_test_must_be_disjoint(tmp_path):
    path = ml100k(tmp_path)
    _write(tmp_path / "ml-100k" / "u1.test", _lines([ROWS[2], ROWS[1]], "\t"))
    with pytest.raises(ValueError, match=r"u1.test:2: user 1 rated item 20 again \(first at "
                                         r".*u1.base:2\).* must be disjoint"):
        load_movielens(path, "u1")


def test_duplicate_line_numbers_count_the_header_and_blank_lines(tmp_path):
    rows = _lines(HALF[:3], ",", lambda r: f"{r:.1f}") + ["", ""] + \
        _lines(HALF[:1], ",", lambda r: f"{r:.1f}")
    path = _write(tmp_path / "ratings.csv", rows, header="userId,movieId,rating,timestamp")
    with pytest.raises(ValueError, match=r"ratings.csv:7: user 1 rated item 10 again "
                                         r"\(first at line 2\)"):
        read_ratings_file(path, "ml-latest")
