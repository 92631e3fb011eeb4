"""A multilayer perceptron (flax linen) behind the :class:`Model` interface.

McMahan, Moore, Ramage, Hampson and Aguera y Arcas, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017, Sec. 3: the "2NN" is "a simple
multilayer-perceptron with 2-hidden layers with 200 units each using ReLu activations
(199,210 total parameters)" on MNIST, i.e. ``mlp((784,), (200, 200), 10)``.

The input is flattened, so any example shape works; the output is ``num_classes`` logits
with the softmax cross-entropy loss (:func:`~fedjax_lite.models.flax_adapter.from_flax`).
Weights are drawn from the init key (flax's defaults: LeCun-normal kernels, zero biases).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax

from fedjax_lite.models.base import Model
from fedjax_lite.models.flax_adapter import from_flax

TWO_NN = (200, 200)     # McMahan et al.'s 2NN


class MLP(nn.Module):
    """x[B, ...] -> flatten -> (Dense(h) -> ReLU for h in hidden) -> Dense(num_classes)."""
    hidden: tuple[int, ...]
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape(x.shape[0], -1)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_classes)(x)


def check_num_classes(num_classes: int, kind: str) -> None:
    """ValueError unless ``num_classes`` is an integer >= 2 (a softmax over classes)."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 2:
        raise ValueError(f"{kind}: num_classes must be an integer >= 2, got "
                         f"{num_classes!r}")


def check_widths(widths: Sequence[int], what: str) -> tuple[int, ...]:
    """``widths`` as a tuple of positive ints (ValueError naming ``what`` otherwise)."""
    widths = tuple(widths)
    if not all(isinstance(w, int) and not isinstance(w, bool) and w > 0 for w in widths):
        raise ValueError(f"{what} must be positive integers, got {list(widths)!r}")
    return widths


def mlp(input_shape: Sequence[int], hidden_sizes: Sequence[int] = TWO_NN,
        num_classes: int = 10) -> Model:
    """A ReLU MLP on flattened examples of shape ``input_shape`` with hidden layers of
    ``hidden_sizes`` units (at least one layer) and a softmax over ``num_classes``."""
    check_num_classes(num_classes, "mlp")
    hidden = check_widths(hidden_sizes, "mlp: hidden_sizes")
    if not hidden:
        raise ValueError("mlp: hidden_sizes is empty; a model without hidden layers is "
                         "multinomial_logistic_regression")
    shape = tuple(int(s) for s in input_shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"mlp: input_shape must have positive sizes, got {shape}")
    return from_flax(MLP(hidden, num_classes), shape, num_classes)


__all__ = ["MLP", "TWO_NN", "check_num_classes", "check_widths", "mlp"]
