"""Models: pure (init, apply, loss, predict) functions on parameter pytrees."""

from fedjax_lite.models.base import Model, masked_mean_loss
from fedjax_lite.models.flax_adapter import from_flax
from fedjax_lite.models.linear import logistic_regression, multinomial_logistic_regression

__all__ = ["Model", "from_flax", "logistic_regression", "masked_mean_loss",
           "multinomial_logistic_regression"]
