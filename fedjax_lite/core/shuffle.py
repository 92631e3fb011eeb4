"""Per-epoch example orders for a chunk of clients, computed together.

Each (client, epoch) needs a uniformly random order of the client's ``n`` real
examples, with padding after them, that does not depend on how far the client was
padded. A comparison sort inside one vmapped client is slow on CPUs (XLA's sort calls a
comparator per element; ``jnp.argsort`` made a FedAvg round 5x slower than everything
else together), so the orders of many clients are produced at once by a bitonic sorting
network laid out with the client axis minor, where every compare-exchange is a wide
vector min/max -- on GPUs the same network is equally parallel.

Sort keys: one 32-bit seed per (client, epoch) from the client's threefry key, then a
counter-based hash of each example index ``i``: ``h(i) = fmix32(seed ^ (i * 0x9E3779B9))``
with murmur3's finalizer. ``h`` is a bijection of ``i`` (xor-shifts and odd multiplies
are invertible mod 2^32), so distinct examples get distinct keys, only the keys are
sorted, and each sorted key is mapped back to its example index by inverting ``h``.
Keys depend only on (seed, i), never on the padded length.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

_GOLDEN = np.uint32(0x9E3779B9)
_C1, _C2 = 0x85EBCA6B, 0xC2B2AE35


def _inverse_mod_2_32(a: int) -> np.uint32:
    """Multiplicative inverse of an odd ``a`` modulo 2^32 (Newton's iteration)."""
    x = 1
    for _ in range(5):
        x = (x * (2 - a * x)) & 0xFFFFFFFF
    return np.uint32(x)


_INV_C1, _INV_C2, _INV_GOLDEN = (_inverse_mod_2_32(_C1), _inverse_mod_2_32(_C2),
                                 _inverse_mod_2_32(int(_GOLDEN)))


def fmix32(h: jax.Array) -> jax.Array:
    """murmur3's 32-bit finalizer (Appleby, MurmurHash3): a bijective avalanche mix."""
    h = h ^ (h >> 16)
    h = h * np.uint32(_C1)
    h = h ^ (h >> 13)
    h = h * np.uint32(_C2)
    return h ^ (h >> 16)


def fmix32_inverse(h: jax.Array) -> jax.Array:
    """The inverse of :func:`fmix32`."""
    h = h ^ (h >> 16)
    h = h * _INV_C2
    h = h ^ (h >> 13) ^ (h >> 26)
    h = h * _INV_C1
    return h ^ (h >> 16)


def _bitonic_sort_axis0(a: jax.Array) -> jax.Array:
    """Sorts ``a`` [M, ...] ascending along axis 0 (M a power of two); trailing axes are
    independent lanes. Batcher's bitonic network in the form whose comparators all point
    the same way: merging blocks of size k first compares item t with item k-1-t (a
    flip), then half-cleaners at distances k/4, k/8, ..., 1."""
    M, rest = a.shape[0], a.shape[1:]
    k = 2
    while k <= M:
        r = a.reshape((M // k, k) + rest)
        lo, hi = r[:, :k // 2], jnp.flip(r[:, k // 2:], 1)
        a = jnp.concatenate([jnp.minimum(lo, hi), jnp.flip(jnp.maximum(lo, hi), 1)],
                            1).reshape(a.shape)
        j = k // 4
        while j >= 1:
            r = a.reshape((M // (2 * j), 2, j) + rest)
            a = jnp.stack([jnp.minimum(r[:, 0], r[:, 1]), jnp.maximum(r[:, 0], r[:, 1])],
                          1).reshape(a.shape)
            j //= 2
        k *= 2
    return a


def _bitonic_sort_rolled(a: jax.Array) -> jax.Array:
    """:func:`_bitonic_sort_axis0` with its log2(M)(log2(M)+1)/2 compare-exchange stages
    in a ``lax.fori_loop`` instead of unrolled, so the program holds ONE stage (compile
    time no longer grows with the network). Stage (k, j) pairs item i with i XOR j; the
    lower of the two keeps the minimum when bit k of i is 0, the maximum otherwise
    (Batcher's network in its alternating-direction form: the same sorted result)."""
    M = a.shape[0]
    stages = [(k, j) for k in (1 << e for e in range(1, M.bit_length()))
              for j in (1 << e for e in range(k.bit_length() - 2, -1, -1))]
    ks = jnp.asarray([k for k, _ in stages], jnp.int32)
    js = jnp.asarray([j for _, j in stages], jnp.int32)
    i = jnp.arange(M, dtype=jnp.int32)
    lanes = (M,) + (1,) * (a.ndim - 1)

    def stage(s, a):
        k, j = ks[s], js[s]
        partner = i ^ j
        b = jnp.take(a, partner, axis=0)
        keep_min = ((i & k) == 0) == (i < partner)
        return jnp.where(keep_min.reshape(lanes), jnp.minimum(a, b), jnp.maximum(a, b))

    return lax.fori_loop(0, len(stages), stage, a)


def _network_sizes(M: int) -> list[int]:
    """Sorting-network lengths to choose from: M and its halves down to 64 (smaller
    networks cost too little to be worth a branch)."""
    sizes = [M]
    while sizes[-1] > 64:
        sizes.append(sizes[-1] // 2)
    return sizes[::-1]


def epoch_orders_lanes(keys: jax.Array, n: jax.Array, num_examples: int,
                       num_epochs: int) -> jax.Array:
    """int32[E, N, K] (client axis minor): see :func:`epoch_orders`.

    Only the first ``m`` keys are hashed and sorted, ``m`` the smallest network length
    (a power of two, picked at run time with ``lax.switch``) that holds the largest
    client: real keys sort before padding keys, so a longer network would put the same
    indices first. A chunk of small clients from a skewed population therefore does not
    pay for sorting the largest client's padded length.
    """
    N, E = num_examples, num_epochs
    M = 1 << max(N - 1, 0).bit_length()                       # next power of two >= N
    seeds = jax.vmap(lambda k: jax.random.bits(k, (E,), jnp.uint32))(keys).T   # [E, K]
    n_u = n.astype(jnp.uint32)[None, None, :]

    def sort_first(m: int):
        def ranked_indices():
            index = jnp.arange(m, dtype=jnp.uint32).reshape(m, 1, 1)
            hashed = fmix32(seeds[None] ^ (index * _GOLDEN))                  # [m, E, K]
            # Real keys are capped below the padding key; a real key hashing to
            # 0xFFFFFFFF (probability 2^-32 per example) would then repeat one index.
            sort_keys = jnp.where(index < n_u, jnp.minimum(hashed, np.uint32(0xFFFFFFFE)),
                                  np.uint32(0xFFFFFFFF))
            ranked = SORT(sort_keys)[:min(m, N)]
            order = (fmix32_inverse(ranked) ^ seeds[None]) * _INV_GOLDEN      # h^-1
            if m < N:                           # rows past m are padding slots (below)
                order = jnp.concatenate([order, jnp.zeros((N - m,) + order.shape[1:],
                                                          order.dtype)])
            return order
        return ranked_indices

    sizes = _network_sizes(M)
    if len(sizes) == 1:
        order = sort_first(M)()
    else:
        largest = jnp.max(n).astype(jnp.int32)
        branch = jnp.sum(jnp.asarray(sizes[:-1], jnp.int32) < largest)
        order = lax.switch(branch, [sort_first(m) for m in sizes])
    position = jnp.arange(N, dtype=jnp.uint32).reshape(N, 1, 1)
    order = jnp.where(position < n_u, order, position)        # padding slots: any index
    return jnp.transpose(jnp.minimum(order, np.uint32(N - 1)).astype(jnp.int32), (1, 0, 2))


def epoch_orders(keys: jax.Array, n: jax.Array, num_examples: int,
                 num_epochs: int) -> jax.Array:
    """int32[K, E, N]: for client k and epoch e, a random order of ``0..n[k]-1`` in the
    first ``n[k]`` positions; the remaining positions hold in-range padding indices.

    Args:
      keys: [K] PRNG keys, one per client.
      n: int[K] real example counts.
      num_examples: N, the padded length; num_epochs: E.
    """
    return jnp.transpose(epoch_orders_lanes(keys, n, num_examples, num_epochs), (2, 0, 1))



# Networks longer than this run their stages in a loop: the quickstart's round (networks
# of 64, 128 and 256 behind the size switch) compiled in 2.4 s instead of 2.9-3.0 s with
# the same round time (all three rolled: 2.0 s); the 64-long network stays unrolled,
# where the loop cost up to a third more per round (a 1000-client round of 64-example
# clients: 11.6-16.8 ms vs 10.9-12.2 ms). Measured on this project's 2-core CPU, one
# process per variant, variants alternated.
ROLL_ABOVE = 64


def SORT(a: jax.Array) -> jax.Array:
    return _bitonic_sort_rolled(a) if a.shape[0] > ROLL_ABOVE else _bitonic_sort_axis0(a)
