"""Zero-initialized linear models: binary and multinomial logistic regression."""

from __future__ import annotations

import jax.numpy as jnp

from fedjax_lite.models.base import Model, sigmoid_loss, softmax_loss


def logistic_regression(num_features: int) -> Model:
    """Binary logistic regression, ``p(y=1|x) = sigmoid(x . w + b)``, labels in {0, 1}."""

    def init(key):
        del key  # zero init
        return {"w": jnp.zeros((num_features,), jnp.float32), "b": jnp.zeros((), jnp.float32)}

    def apply(params, x):
        return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]

    return Model(init, apply, sigmoid_loss, lambda logits: (logits > 0).astype(jnp.int32), 2)


def multinomial_logistic_regression(num_features: int, num_classes: int) -> Model:
    """Softmax regression, ``p(y|x) = softmax(x W + b)``, labels in [0, num_classes)."""

    def init(key):
        del key
        return {"w": jnp.zeros((num_features, num_classes), jnp.float32),
                "b": jnp.zeros((num_classes,), jnp.float32)}

    def apply(params, x):
        return x.reshape(x.shape[0], -1) @ params["w"] + params["b"]

    return Model(init, apply, softmax_loss, lambda logits: jnp.argmax(logits, -1), num_classes)
