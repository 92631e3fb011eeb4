"""Privacy: accounting (dp-accounting), DP mechanisms, secure aggregation.

* :mod:`~fedjax_lite.privacy.accounting` -- epsilon for the sampling the engine performs,
  under a named neighbouring relation (host side, dp-accounting's RDP / PLD accountants);
* :mod:`~fedjax_lite.privacy.clipping` -- L2 clipping that bounds every input;
* :mod:`~fedjax_lite.privacy.gaussian` -- DP-FedAvg's Gaussian mechanism, adaptive clipping;
* :mod:`~fedjax_lite.privacy.ftrl` -- DP-FTRL with tree aggregation;
* :mod:`~fedjax_lite.privacy.secagg` -- secure aggregation with dropouts (SecAgg, SecAgg+).

Each module states at its top the neighbouring relation, sampling and sensitivity it assumes.
"""

from fedjax_lite.privacy.accounting import (AccountingError, PrivacySetup, calibrate,
                                            default_neighboring, describe, epsilon)

__all__ = ["AccountingError", "PrivacySetup", "calibrate", "default_neighboring",
           "describe", "epsilon"]
