"""Differential privacy: accounting for DP-FedAvg (host-side)."""

from fedjax_lite.privacy.accountant import (DEFAULT_ORDERS, PrivacySpent, dp_epsilon,
                                            epsilon_from_rdp, noise_multiplier_for,
                                            rdp_sampled_gaussian)

__all__ = ["DEFAULT_ORDERS", "PrivacySpent", "dp_epsilon", "epsilon_from_rdp",
           "noise_multiplier_for", "rdp_sampled_gaussian"]
