"""Population-sized per-client state: one row per population client, gathered and
scattered with the cohort inside the compiled round.

A client state is any pytree whose leaves all have a leading axis of K rows (K = the
population size, ``population['n'].shape[0]``): SCAFFOLD's control variates c_i,
error-feedback residuals e_i, personal models. It is a plain pytree of arrays, so it
lives in the algorithm's state, travels through ``jit`` and is checkpointed with the run.

    state = zeros(K, params)                # float[K, *leaf.shape] per leaf
    rows  = gather(state, cohort)           # the cohort's rows, leading axis C
    ...                                     # the round computes new rows
    state = scatter(state, cohort, new_rows, keep=~reported)

``scatter`` writes row ``cohort.index[c]`` only for real cohort members (``cohort.mask``)
that are not marked ``keep``; every other population row -- clients outside the cohort,
the rows a padding slot happens to point at, clients that dropped out -- keeps its old
value. Cohorts hold distinct rows (sampling is without replacement), so writes never
collide.

With the population on the host (``data.storage`` host / mmap) the client state stays
there too: the host hands the round only the cohort's rows, in the order of the cohort's
gathered data (``cohort.rows``), and writes the real members' rows back afterwards. The
algorithm's code is the same: ``gather``/``scatter`` then address rows by
``cohort.rows`` instead of ``cohort.index``. The fields of an algorithm's state that hold
client state are named in :data:`FIELDS`.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from fedjax_lite.core.round import Cohort

ClientState = Any   # pytree, every leaf with leading axis K (population rows)

# the names of population-sized client-state fields in the algorithms' states: SCAFFOLD's
# control variates, error-feedback residuals, FCF's private user factors, Ditto's personal
# models
FIELDS = ("client_c", "residuals", "private", "personal")


def zeros(num_clients: int, like: Any) -> ClientState:
    """K zero rows shaped like ``like`` (a params-like pytree of arrays)."""
    if not (isinstance(num_clients, int) and num_clients >= 1):
        raise ValueError(f"client_state: num_clients must be a positive int, got "
                         f"{num_clients!r}")
    return jax.tree.map(lambda p: jnp.zeros((num_clients,) + jnp.shape(p),
                                            jnp.result_type(p)), like)


def num_rows(state: ClientState) -> int:
    """K, the leading axis shared by every leaf (ValueError if they disagree)."""
    sizes = {jnp.shape(a)[0] for a in jax.tree.leaves(state)}
    if len(sizes) != 1:
        raise ValueError(f"client_state: leaves must share one leading axis (population "
                         f"rows), got sizes {sorted(sizes)}")
    return sizes.pop()


def _held(cohort: Cohort) -> tuple[jax.Array, int]:
    """(the rows that address the cohort's members in the state, how many rows the
    state holds): population rows, or -- cohort-sized state on the host path -- the
    members' positions in the gathered cohort."""
    if cohort.rows is None:
        return cohort.index, cohort.num_clients
    return cohort.rows, cohort.population["n"].shape[0]


def _check(state: ClientState, cohort: Cohort, what: str) -> None:
    rows, population = num_rows(state), _held(cohort)[1]
    if rows != population:          # static shapes: raised at trace time
        raise ValueError(f"client_state.{what}: the state has {rows} rows but the "
                         f"population has {population} clients")


def gather(state: ClientState, cohort: Cohort) -> ClientState:
    """The cohort's rows (leading axis C, cohort order). A padding slot gets the row its
    index points at; whatever is computed from it is never written back."""
    _check(state, cohort, "gather")
    at = _held(cohort)[0]
    return jax.tree.map(lambda a: jnp.take(a, at, axis=0), state)


def scatter(state: ClientState, cohort: Cohort, rows: ClientState,
            keep: jax.Array | None = None) -> ClientState:
    """Writes ``rows`` (leading axis C) back to the cohort's population rows.

    Slot c writes only if ``cohort.mask[c]`` and not ``keep[c]`` (bool[C], e.g. clients
    that dropped out and sent nothing); all other rows are unchanged.
    """
    _check(state, cohort, "scatter")
    write = cohort.mask if keep is None else cohort.mask & ~keep
    target = jnp.where(write, _held(cohort)[0], num_rows(state))   # out of range: dropped
    return jax.tree.map(lambda a, r: a.at[target].set(r.astype(a.dtype), mode="drop"),
                        state, rows)
