"""Host-side federated data (NumPy only; never imports JAX)."""

from fedjax_lite.data.digits import federated_digits
from fedjax_lite.data.leaf import LeafDataset, load_leaf
from fedjax_lite.data.npz import load_npz
from fedjax_lite.data.population import (Population, check_cohort_size, choose_attackers,
                                         flip_labels, from_flat, from_ragged, sample_cohort,
                                         split_clients, split_examples)
from fedjax_lite.data.synthetic import fedprox_synthetic, synthetic_logistic

__all__ = ["LeafDataset", "Population", "check_cohort_size", "choose_attackers",
           "federated_digits", "flip_labels", "load_leaf",
           "fedprox_synthetic", "from_flat", "from_ragged", "load_npz", "sample_cohort",
           "split_clients", "split_examples", "synthetic_logistic"]
