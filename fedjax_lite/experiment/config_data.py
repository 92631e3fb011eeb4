"""The data section's schema (``data.kind`` and each kind's keys): frozen dataclasses
with defaults, allowed values and range checks, re-exported by
:mod:`fedjax_lite.experiment.config_schema`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal, Union

from fedjax_lite.experiment.config_fields import (_FRACTION, _NONNEG, _POS, _POS_INT,
                                                  SEED_MAX, _check)


# ----------------------------------------------------------------------------- data

# How the test set is carved out when no test file is given: 'examples' = test_fraction of
# every client's examples; 'clients' = whole clients held out (each with probability
# test_fraction, by a hash of its id); 'auto' = clients for DP runs (their test data must
# lie outside the training population), examples otherwise.
TEST_SPLITS = ("auto", "examples", "clients")

# Where the training population lives during a run (data.storage): 'device' -- on the
# device(s) for the whole run; 'host' -- in host memory, each round's cohort gathered on
# the host and transferred while the previous round computes; 'mmap' -- memory-mapped .npy
# files on disk (written once by `fedjax-lite prepare`, or into OUT/prepared), for
# populations larger than RAM; 'auto' -- device when it fits the device memory budget,
# host when it fits RAM, mmap otherwise. Results are identical across storages.
STORAGES = ("auto", "device", "host", "mmap")
# data.seed: the data's own seed (generation and splits); null = the run's seed
_DATA_SEED = _check(lambda v: v is None or 0 <= v <= SEED_MAX,
                    "null or an integer in [0, 2**63 - 1]")


@dataclass(frozen=True)
class SyntheticLogisticData:
    """Binary clients sharing one linear boundary, with feature shift and size skew."""
    kind: Literal["synthetic_logistic"] = "synthetic_logistic"
    num_clients: int = field(default=1000, metadata=_POS_INT)
    num_features: int = field(default=20, metadata=_POS_INT)
    mean_examples: float = field(default=50.0, metadata=_POS)
    size_sigma: float = field(default=0.5, metadata=_NONNEG)
    min_examples: int = field(default=4, metadata=_check(lambda v: v >= 2, "an integer >= 2"))
    feature_shift: float = field(default=1.0, metadata=_NONNEG)
    label_noise: float = field(default=0.02, metadata=_check(lambda v: 0 <= v <= 0.5,
                                                            "a number in [0, 0.5]"))
    test_fraction: float = field(default=0.2, metadata=_FRACTION)
    test_split: Literal[TEST_SPLITS] = "auto"
    storage: Literal[STORAGES] = "auto"
    prepared: Union[str, None] = None       # mmap: a `fedjax-lite prepare` folder
    seed: Union[int, None] = field(default=None, metadata=_DATA_SEED)


@dataclass(frozen=True)
class FedProxSyntheticData:
    """Synthetic(alpha, beta) of Li et al. (MLSys 2020), section 5.1, or its IID variant."""
    kind: Literal["fedprox_synthetic"] = "fedprox_synthetic"
    alpha: float = field(default=1.0, metadata=_NONNEG)
    beta: float = field(default=1.0, metadata=_NONNEG)
    iid: bool = False
    num_clients: int = field(default=30, metadata=_POS_INT)
    num_features: int = field(default=60, metadata=_POS_INT)
    num_classes: int = field(default=10, metadata=_check(lambda v: v >= 2, "an integer >= 2"))
    test_fraction: float = field(default=0.2, metadata=_FRACTION)
    test_split: Literal[TEST_SPLITS] = "auto"
    storage: Literal[STORAGES] = "auto"
    prepared: Union[str, None] = None       # mmap: a `fedjax-lite prepare` folder
    seed: Union[int, None] = field(default=None, metadata=_DATA_SEED)


@dataclass(frozen=True)
class NpzData:
    """Bring-your-own data: .npz files with arrays x (N, d), y (N,), client (N,)."""
    kind: Literal["npz"] = "npz"
    path: str = ""
    test_path: str | None = None
    test_fraction: float = field(default=0.2, metadata=_FRACTION)
    test_split: Literal[TEST_SPLITS] = "auto"      # without test_path
    storage: Literal[STORAGES] = "auto"
    prepared: Union[str, None] = None       # mmap: a `fedjax-lite prepare` folder
    seed: Union[int, None] = field(default=None, metadata=_DATA_SEED)


@dataclass(frozen=True)
class PreparedData:
    """A prepared folder as the data itself (``fedjax_lite.data.prepared``: train/ and
    test/ .npy arrays, written by ``fedjax-lite prepare`` or block by block with
    ``PreparedWriter`` for populations larger than RAM); read memory-mapped by default."""
    kind: Literal["prepared"] = "prepared"
    path: str = ""
    storage: Literal[STORAGES] = "auto"


@dataclass(frozen=True)
class LeafData:
    """LEAF-format JSON (FEMNIST, Shakespeare, Sent140, FedProx's synthetic data): a file
    or a directory of files, one client per user (fedjax_lite.data.leaf)."""
    kind: Literal["leaf"] = "leaf"
    path: str = ""
    test_path: str | None = None
    vocab_size: int = field(default=1000, metadata=_POS_INT)   # Sent140 bag of words
    test_fraction: float = field(default=0.2, metadata=_FRACTION)
    test_split: Literal[TEST_SPLITS] = "auto"      # without test_path
    storage: Literal[STORAGES] = "auto"
    prepared: Union[str, None] = None       # mmap: a `fedjax-lite prepare` folder
    seed: Union[int, None] = field(default=None, metadata=_DATA_SEED)


# How a centralized dataset is spread over clients (fedjax_lite.data.partition): iid;
# dirichlet label skew (Hsu et al. 2019, concentration alpha); shards, McMahan et al.'s
# (2017) pathological split (shards_per_client label-sorted shards each); quantity_skew,
# lognormal client sizes (log-scale sigma) with IID labels.
PARTITIONS = ("iid", "dirichlet", "shards", "quantity_skew")
PARTITION_KEYS = {"alpha": ("dirichlet",), "shards_per_client": ("shards",),
                  "sigma": ("quantity_skew",)}


@dataclass(frozen=True)
class PartitionConfig:
    kind: Literal[PARTITIONS] = "iid"
    alpha: float = field(default=0.5, metadata=_POS)             # dirichlet
    shards_per_client: int = field(default=2, metadata=_POS_INT)  # shards
    sigma: float = field(default=1.0, metadata=_NONNEG)           # quantity_skew


@dataclass(frozen=True)
class SklearnDigitsData:
    """scikit-learn's bundled 8x8 digits (1797 images, 10 classes): a stratified held-out
    test set, the rest partitioned over num_clients (fedjax_lite.data.digits)."""
    kind: Literal["sklearn_digits"] = "sklearn_digits"
    partition: PartitionConfig = field(default_factory=PartitionConfig)
    num_clients: int = field(default=100, metadata=_POS_INT)
    test_fraction: float = field(default=0.2, metadata=_check(lambda v: 0 < v < 1,
                                                              "a number in (0, 1)"))
    # pooled: a stratified test set of its own clients; examples: test_fraction of every
    # client's own examples (test client k = training client k: personalization)
    test_split: Literal["pooled", "examples"] = "pooled"
    storage: Literal[STORAGES] = "auto"
    prepared: Union[str, None] = None       # mmap: a `fedjax-lite prepare` folder
    seed: Union[int, None] = field(default=None, metadata=_DATA_SEED)


RATING_SPLITS = ("random", "temporal", "leave_one_out")
MOVIELENS_SPLITS = ("u1", "u2", "u3", "u4", "u5", "ua", "ub") + RATING_SPLITS


@dataclass(frozen=True)
class SyntheticRatingsData:
    """Ratings shaped like MovieLens-100k by default (power-law activity and popularity,
    low-rank structure, biases, noise, integer ratings 1-5): each user is one client."""
    kind: Literal["synthetic_ratings"] = "synthetic_ratings"
    num_users: int = field(default=943, metadata=_POS_INT)
    num_items: int = field(default=1682, metadata=_POS_INT)
    num_ratings: int = field(default=100_000, metadata=_POS_INT)
    split: Literal[RATING_SPLITS] = "random"
    test_fraction: float = field(default=0.2, metadata=_FRACTION)
    # fcf only: host keeps the ratings and the private user factors on the host
    storage: Literal["auto", "device", "host"] = "auto"


@dataclass(frozen=True)
class MovieLensData:
    """A MovieLens directory as GroupLens distributes it (ml-100k, ml-1m, ml-latest,
    ml-latest-small): each user is one client."""
    kind: Literal["movielens"] = "movielens"
    path: str = ""
    split: Literal[MOVIELENS_SPLITS] = "u1"
    test_fraction: float = field(default=0.2, metadata=_FRACTION)
    storage: Literal["auto", "device", "host"] = "auto"       # host: fcf only


RATINGS_DATA = ("synthetic_ratings", "movielens")
DataConfig = Union[SyntheticLogisticData, FedProxSyntheticData, NpzData, PreparedData,
                   LeafData, SklearnDigitsData, SyntheticRatingsData, MovieLensData]
DATA_KINDS = {c.__dataclass_fields__["kind"].default: c
              for c in (SyntheticLogisticData, FedProxSyntheticData, NpzData, PreparedData,
                        LeafData,
                        SklearnDigitsData, SyntheticRatingsData, MovieLensData)}


__all__ = ["DATA_KINDS", "MOVIELENS_SPLITS", "PARTITION_KEYS", "PARTITIONS", "RATING_SPLITS",
           "RATINGS_DATA", "STORAGES", "TEST_SPLITS", "DataConfig", "FedProxSyntheticData",
           "LeafData", "MovieLensData", "NpzData", "PartitionConfig", "PreparedData",
           "SklearnDigitsData", "SyntheticLogisticData", "SyntheticRatingsData"]
