"""Swept hyper-parameters: one member's value of a vmapped sweep, inside the builders.

A sweep's vmapped group builds the algorithm INSIDE the vmapped function from a config in
which every swept numeric key is a :class:`Swept`: the member's value as a traced scalar
(``value``) plus every member's value on the host (``host``). The ordinary builders then
compute exactly what a member's own run computes:

* arithmetic (``lr * g``, ``0.5 * mu * sq``, ``-lr``) is traced: a :class:`Swept` meeting a
  Python number stays a :class:`Swept` (its host values follow), meeting an array gives a
  plain traced array; ``jnp`` functions read it through ``__jax_array__``; it is a pytree
  (its traced value the one leaf), so it also passes through ``jax.jit``-ed helpers;
* a Python decision on it (``if mu < 0``, ``bool``, ``max``) is taken on the host values
  when ALL members agree on it; converting it to a concrete number (``float``, ``int``,
  ``np.asarray``) or a comparison on which the members disagree raises
  :class:`NotVmappable` naming the key -- the sweep then splits the group by that key's
  value (each part still vmapped over the rest) instead of computing something else.
"""

from __future__ import annotations

import operator

import jax
import numpy as np


class NotVmappable(Exception):
    """The builders need a concrete value of ``key`` (None: of some swept key)."""

    def __init__(self, key: str | None, why: str):
        self.key, self.why = key, why
        super().__init__(f"{key or 'a swept key'}: {why}")


TRACER_ERRORS = (jax.errors.ConcretizationTypeError, jax.errors.TracerArrayConversionError,
                 jax.errors.TracerBoolConversionError, jax.errors.TracerIntegerConversionError)


def not_vmappable(error: BaseException) -> NotVmappable | None:
    """The :class:`NotVmappable` behind ``error`` (also through ``raise ... from`` chains
    and wrapped tracer-conversion errors), else None."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, NotVmappable):
            return error
        if isinstance(error, TRACER_ERRORS):
            return NotVmappable(None, f"{type(error).__name__} while building the program")
        error = error.__cause__ or error.__context__
    return None


def _unwrap(x):
    return (x.value, x.host) if isinstance(x, Swept) else (x, None)


def _is_number(x) -> bool:
    return isinstance(x, (int, float, np.number)) and not isinstance(x, bool)


@jax.tree_util.register_pytree_node_class
class Swept:
    """One member's value of swept config key ``key`` (see the module docstring)."""

    __slots__ = ("value", "host", "key")

    def __init__(self, value, host: tuple, key: str):
        self.value, self.host, self.key = value, tuple(float(h) for h in host), key

    # pytree: the traced value is the leaf; the host values and key are static
    def tree_flatten(self):
        return (self.value,), (self.host, self.key)

    @classmethod
    def tree_unflatten(cls, aux, children):
        obj = object.__new__(cls)
        obj.value, (obj.host, obj.key) = children[0], aux
        return obj

    def __jax_array__(self):
        return self.value

    def _host_op(self, op, other_host, reverse: bool):
        mine = np.asarray(self.host, np.float64)
        with np.errstate(all="ignore"):
            return tuple(op(other_host, mine) if reverse else op(mine, other_host))

    def _binary(self, other, op, reverse=False):
        other_value, other_host = _unwrap(other)
        if other_host is None and not _is_number(other):
            # an array or tracer: the result is a plain (traced) array
            return op(other_value, self.value) if reverse else op(self.value, other_value)
        host = np.asarray(other if other_host is None else other_host, np.float64)
        value = op(other_value, self.value) if reverse else op(self.value, other_value)
        return Swept(value, self._host_op(op, host, reverse), self.key)

    def _decide(self, other, op) -> bool:
        _, other_host = _unwrap(other)
        if other_host is None and not _is_number(other):
            return NotImplemented
        host = np.asarray(other if other_host is None else other_host, np.float64)
        answers = {bool(a) for a in self._host_op(op, host, False)}
        if len(answers) > 1:
            raise NotVmappable(self.key, "the builders take a Python decision on it that "
                                         "differs between members")
        return answers.pop()

    def _concrete(self, convert):
        if len(set(self.host)) > 1:
            raise NotVmappable(self.key, "the builders need it as a concrete number")
        return convert(self.host[0])

    __float__ = lambda self: self._concrete(float)
    __int__ = lambda self: self._concrete(int)
    __index__ = lambda self: self._concrete(operator.index)

    def __array__(self, dtype=None, copy=None):
        raise NotVmappable(self.key, "the builders convert it to a NumPy array")

    def __bool__(self):
        return self._decide(0.0, operator.ne)

    def __repr__(self):
        return f"Swept({self.key}: {', '.join(f'{h:g}' for h in self.host)})"

    __str__ = __repr__
    __hash__ = object.__hash__

    def __neg__(self):
        return Swept(-self.value, tuple(-h for h in self.host), self.key)

    def __pos__(self):
        return self

    def __abs__(self):
        return Swept(abs(self.value), tuple(abs(h) for h in self.host), self.key)


def _install():
    binary = {"add": operator.add, "sub": operator.sub, "mul": operator.mul,
              "truediv": operator.truediv, "floordiv": operator.floordiv,
              "pow": operator.pow, "mod": operator.mod}
    for name, op in binary.items():
        setattr(Swept, f"__{name}__", lambda self, o, op=op: self._binary(o, op))
        setattr(Swept, f"__r{name}__", lambda self, o, op=op: self._binary(o, op, True))
    for name, op in {"lt": operator.lt, "le": operator.le, "gt": operator.gt,
                     "ge": operator.ge, "eq": operator.eq, "ne": operator.ne}.items():
        setattr(Swept, f"__{name}__", lambda self, o, op=op: self._decide(o, op))


_install()

__all__ = ["NotVmappable", "Swept", "TRACER_ERRORS", "not_vmappable"]
