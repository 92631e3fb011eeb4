"""The CNN of McMahan et al. (flax linen) behind the :class:`Model` interface.

McMahan, Moore, Ramage, Hampson and Aguera y Arcas, "Communication-Efficient Learning of
Deep Networks from Decentralized Data", AISTATS 2017, Sec. 3: "A CNN with two 5x5
convolution layers (the first with 32 channels, the second with 64, each followed with
2x2 max pooling), a fully connected layer with 512 units and ReLu activation, and a final
softmax output layer (1,663,370 total parameters)". The convolutions are ReLU-activated
and SAME-padded -- the padding that gives the paper's parameter count on 28x28 MNIST
(7x7x64 = 3136 features into the 512-unit layer), as in TensorFlow Federated's
``create_original_fedavg_cnn_model``. Pooling is SAME too, so odd sides round up.

Two sizes, chosen from ``input_shape`` (the widths can be overridden):

* full (the paper's): channels (32, 64), dense 512, for images whose shorter side is at
  least :data:`FULL_FROM` pixels. Parameters: 1,663,370 with 10 classes (MNIST, as the
  paper says); 1,690,046 with 62 (FEMNIST).
* scaled, for smaller images -- 8x8 scikit-learn digits: the same layers (two 5x5 SAME
  convolutions each followed by 2x2 max pooling, a ReLU dense layer, softmax), with
  channels (16, 32) and dense 64. The dense layer keeps the paper's width per input
  pixel (512 units for 784 pixels, 0.65 a pixel, is 42 for 64 pixels; rounded up to a
  power of two, 64); the channels are halved (keeping the paper's 1:2 progression),
  which makes the second convolution -- the bulk of the arithmetic, proportional to the
  product of the two channel counts -- 4x cheaper on a CPU, for images of 12x fewer
  pixels in a data set of 33x fewer examples (1,797 vs 60,000). Parameters: 22,154 with
  10 classes (8x8 input: 4x4 after the first pooling, 2x2x32 = 128 features after the
  second; the 5x5 kernels then cover the whole 4x4 map), against 650 for multinomial
  logistic regression on the same data. On the digits (100 IID clients, FedAvg with 10
  a round, 5 epochs of batch 10, client SGD 0.05) it reached 98.1% test accuracy in 60
  rounds (multinomial logistic regression: 92.8%), at ~100 clients/s against ~8,000 for
  the linear model on this project's 2-core CPU (a FedAvg round of all 100 clients,
  interleaved in one process, median of 8; shared machine).

``FULL_FROM`` = 15, the geometric mean of 8 and 28 rounded up: each image gets the
nearer of the two designs on a log scale. The counts above are recomputed by
tests/test_flax_models.py.

Inputs: ``input_shape`` is one example's shape: [H, W], [H, W, C], or a flat square
[s*s] (FEMNIST may arrive as 784 floats; it is read as [s, s, 1]). The model accepts a
batch x[B, *input_shape] or any other layout of the same image -- [B, H, W],
[B, H, W, C], [B, H*W*C] -- since it reshapes x to [B, H, W, C].
"""

from __future__ import annotations

import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from fedjax_lite.models.base import Model
from fedjax_lite.models.flax_adapter import from_flax
from fedjax_lite.models.mlp import check_num_classes, check_widths

FULL_CHANNELS, FULL_DENSE = (32, 64), 512      # McMahan et al., Sec. 3
SMALL_CHANNELS, SMALL_DENSE = (16, 32), 64     # the scaled design (module docstring)
FULL_FROM = 15                                  # shorter side for the full design
KERNEL = (5, 5)


class Conv(nn.Module):
    """A stride-1 SAME convolution with ``flax.linen.Conv``'s parameters (kernel
    [kh, kw, C_in, C_out], LeCun-normal; bias zeros), computed as one matmul of the
    im2col patches: the kh * kw shifted windows of the zero-padded input, gathered side
    by side by one constant-index gather.

    Why not ``nn.Conv``: local training vmaps each client's step over clients that hold
    their own kernels, which turns ``lax.conv`` into a grouped convolution (one group per
    client) that XLA:CPU runs slowly; here the vmap batches a matmul instead. Measured on
    this project's 2-core CPU (shared with other jobs: ratios only; median of 4 rounds,
    the two interleaved), a FedAvg round of the 8x8 design (64 clients, 5 epochs of batch
    10): 9.6 s with nn.Conv, 0.97 s this way; of the 28x28 one (8 clients, 1 epoch):
    12.3 s and 0.90 s. The gather compiles ~30% faster than concatenating the 25 windows
    (4.1 s vs 5.7 s for the 8x8 round) and ran within ~10% of its speed. The price is
    memory: the patches hold kh * kw = 25 copies of the layer's input (the 28x28 design's
    second layer: 627 KB an example). Same arithmetic as nn.Conv (tested: values and
    gradients)."""
    features: int
    kernel_size: tuple[int, int] = KERNEL

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        kh, kw = self.kernel_size
        B, H, W, cin = x.shape
        kernel = self.param("kernel", nn.initializers.lecun_normal(),
                            (kh, kw, cin, self.features))
        bias = self.param("bias", nn.initializers.zeros_init(), (self.features,))
        top, left = (kh - 1) // 2, (kw - 1) // 2          # SAME, as lax pads it
        x = jnp.pad(x, ((0, 0), (top, kh - 1 - top), (left, kw - 1 - left), (0, 0)))
        rows, cols = np.meshgrid(np.arange(kh), np.arange(kw), indexing="ij")
        rows = np.arange(H)[:, None, None] + rows.reshape(1, 1, -1)     # [H, 1, kh kw]
        cols = np.arange(W)[None, :, None] + cols.reshape(1, 1, -1)     # [1, W, kh kw]
        patches = x[:, rows, cols].reshape(B, H, W, kh * kw * cin)     # (i, j, c) order
        return patches @ kernel.reshape(kh * kw * cin, self.features) + bias


def max_pool_2x2(x: jax.Array) -> jax.Array:
    """2x2 max pooling, stride 2, SAME (odd sides padded at the end with -inf, as
    ``nn.max_pool(x, (2, 2), (2, 2), "SAME")``), as a reshape and a max: its gradient is
    elementwise, where reduce_window's is a select-and-scatter (a FedAvg round of the 8x8
    design compiled in 3.7 s instead of 9.7 s, one measurement on this shared CPU)."""
    B, H, W, C = x.shape
    Ho, Wo = -(-H // 2), -(-W // 2)
    if (H, W) != (2 * Ho, 2 * Wo):
        x = jnp.pad(x, ((0, 0), (0, 2 * Ho - H), (0, 2 * Wo - W), (0, 0)),
                    constant_values=-jnp.inf)
    return x.reshape(B, Ho, 2, Wo, 2, C).max(axis=(2, 4))


class CNN(nn.Module):
    """x -> [B, *image] -> (Conv 5x5 SAME -> ReLU -> MaxPool 2x2) for each of
    ``channels`` -> flatten -> Dense(dense) -> ReLU -> Dense(num_classes)."""
    image: tuple[int, int, int]
    channels: tuple[int, ...]
    dense: int
    num_classes: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x.reshape((x.shape[0],) + self.image)
        for width in self.channels:
            x = max_pool_2x2(nn.relu(Conv(width)(x)))
        x = x.reshape(x.shape[0], -1)
        x = nn.relu(nn.Dense(self.dense)(x))
        return nn.Dense(self.num_classes)(x)


def image_shape(input_shape: Sequence[int]) -> tuple[int, int, int]:
    """(H, W, C) of one example of shape ``input_shape``: [H, W, C], [H, W] (C = 1) or a
    flat square [s*s] (s, s, 1). ValueError for anything else."""
    shape = tuple(int(s) for s in input_shape)
    if any(s < 1 for s in shape):
        raise ValueError(f"cnn: input shape {shape} has an empty axis")
    if len(shape) == 1:
        side = math.isqrt(shape[0])
        if side * side != shape[0]:
            raise ValueError(f"cnn: input shape {shape} is flat and {shape[0]} is not a "
                             "square number of pixels; the cnn needs images [H, W], "
                             "[H, W, C] or flat squares [s*s] (for other features use "
                             "model.kind mlp)")
        return side, side, 1
    if len(shape) == 2:
        return shape[0], shape[1], 1
    if len(shape) == 3:
        return shape
    raise ValueError(f"cnn: input shape {shape} is not an image [H, W], [H, W, C] or "
                     "[s*s]")


def default_widths(image: tuple[int, int, int]) -> tuple[tuple[int, int], int]:
    """(channels, dense) of the design for ``image``: the paper's from a shorter side of
    :data:`FULL_FROM` pixels, the scaled one below."""
    if min(image[:2]) >= FULL_FROM:
        return FULL_CHANNELS, FULL_DENSE
    return SMALL_CHANNELS, SMALL_DENSE


def cnn(input_shape: Sequence[int], num_classes: int = 10, *,
        channels: Sequence[int] | None = None, dense: int | None = None) -> Model:
    """McMahan et al.'s CNN for examples of shape ``input_shape`` (see the module
    docstring); ``channels`` (two ints) and ``dense`` override the widths the input
    size chooses."""
    check_num_classes(num_classes, "cnn")
    image = image_shape(input_shape)
    default_channels, default_dense = default_widths(image)
    channels = default_channels if channels is None else check_widths(channels,
                                                                      "cnn: channels")
    if len(channels) != 2:
        raise ValueError(f"cnn: channels must be two integers (one per convolution), got "
                         f"{list(channels)!r}")
    dense = default_dense if dense is None else check_widths((dense,), "cnn: dense")[0]
    return from_flax(CNN(image, tuple(channels), dense, num_classes), image, num_classes)


__all__ = ["CNN", "Conv", "FULL_CHANNELS", "FULL_DENSE", "FULL_FROM", "SMALL_CHANNELS",
           "SMALL_DENSE", "cnn", "default_widths", "image_shape", "max_pool_2x2"]
