"""Arbitrary IDs: validation, stable 64-bit keys, deterministic row init, Arrow I/O.

An ID is a Python ``int`` in the signed 64-bit range or a ``str``; ``5`` and
``"5"`` are different IDs. Every process derives the same 64-bit *key* from an ID
(splitmix64 for ints, BLAKE2b for strings), and the key alone decides the ID's
bucket and its initial row, so trainers on different nodes agree on a new row
without talking. Shards store the ID as given and return it, but index rows by the
key alone: two IDs with one key share a row. Strings collide by accident with
probability about n**2 / 2**65 among n of them (the birthday bound); ints map
one-to-one onto keys (splitmix64 is a bijection), so for any string's key an int with
that key can be computed. README "How it works" says what that means for a deployment.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from typing import NamedTuple, Union

import numpy as np
import pyarrow as pa

__all__ = [
    "ID",
    "ID_UNION",
    "Keyed",
    "as_id_array",
    "id_keys",
    "ids_from_arrow",
    "ids_to_arrow",
    "init_rows",
    "keyed",
    "splitmix64",
    "validate_id",
]

ID = Union[int, str]
"""An entity ID: a signed 64-bit int or a string."""

_I64_MIN, _I64_MAX = -(1 << 63), (1 << 63) - 1
_MAX_STR_BYTES = 1024  # IDs are keys, not payloads; a cap keeps a hostile ID from bloating a shard.


def validate_id(value: object, field: str = "id") -> ID:
    """Return ``value`` if it is a valid ID, else raise ``ValueError`` naming ``field``."""
    if isinstance(value, bool):  # bool is an int subclass; True is never a meant ID
        raise ValueError(f"{field}: must be an int or str ID, got bool {value!r}")
    if isinstance(value, (int, np.integer)):
        v = int(value)
        if not _I64_MIN <= v <= _I64_MAX:
            raise ValueError(f"{field}: int ID {v} is outside the signed 64-bit range")
        return v
    if isinstance(value, str):
        if not value:
            raise ValueError(f"{field}: string ID must not be empty")
        try:
            encoded = value.encode("utf-8")
        except UnicodeEncodeError:
            # A lone surrogate cannot be stored in Arrow or sent back as JSON.
            raise ValueError(f"{field}: string ID must be valid Unicode (it has a lone surrogate)") from None
        if len(encoded) > _MAX_STR_BYTES:
            raise ValueError(f"{field}: string ID longer than {_MAX_STR_BYTES} bytes")
        return value
    raise ValueError(f"{field}: must be an int or str ID, got {type(value).__name__} {value!r}")


def as_id_array(ids: Iterable[ID] | np.ndarray) -> np.ndarray:
    """IDs as a 1-D numpy array: ``int64`` when all are ints, else ``object``.

    Raises:
        ValueError: a single ID (a string, bytes or a number) or a numpy array that is not 1-D,
            where a sequence of IDs is expected; an int ID outside the signed 64-bit range.
    """
    if isinstance(ids, (str, bytes, int, float, np.integer, np.floating)):
        # A bare string would be taken as one ID per character, a number would fail deeper.
        raise ValueError(f"ids: expected a sequence of IDs, got a single {type(ids).__name__} {ids!r:.60}; "
                         "wrap one ID in a list")
    if isinstance(ids, np.ndarray) and ids.ndim != 1:
        raise ValueError(f"ids: expected a 1-D sequence of IDs, got an array of shape {ids.shape}")
    if isinstance(ids, np.ndarray):
        if ids.dtype.kind == "u" and len(ids) and int(ids.max()) > _I64_MAX:
            raise ValueError(f"id: unsigned ID {int(ids.max())} is outside the signed 64-bit range")
        if ids.dtype.kind in "iu":
            return ids.astype(np.int64, copy=False)
        if ids.dtype == object:
            return ids
        ids = ids.tolist()
    ids = list(ids)
    if ids and all(isinstance(x, (int, np.integer)) and not isinstance(x, bool) for x in ids):
        try:
            return np.asarray(ids, dtype=np.int64)
        except OverflowError:  # numpy names no value; the caller needs which one
            bad = next(int(x) for x in ids if not _I64_MIN <= int(x) <= _I64_MAX)
            raise ValueError(f"id: int ID {bad} is outside the signed 64-bit range") from None
    out = np.empty(len(ids), dtype=object)
    out[:] = ids
    return out


_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def splitmix64(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser (Steele, Lea & Flood, 2014) of ``uint64`` values, elementwise:
    a bijection on 64-bit integers that mixes every input bit into every output bit."""
    return _splitmix64(x)


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):
        z = x + _GOLDEN
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        return z ^ (z >> np.uint64(31))


def _str_key(s: str) -> int:
    return int.from_bytes(hashlib.blake2b(s.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "little")


def id_keys(ids: Sequence[ID] | np.ndarray) -> np.ndarray:
    """Stable 64-bit keys (``uint64``) of ``ids``, equal in every process and run."""
    arr = as_id_array(ids)
    if arr.dtype == np.int64:
        return _splitmix64(arr.view(np.uint64))
    keys = np.empty(len(arr), dtype=np.uint64)
    ints = np.fromiter((isinstance(x, (int, np.integer)) for x in arr), dtype=bool, count=len(arr))
    if ints.any():
        keys[ints] = _splitmix64(np.asarray(arr[ints].tolist(), dtype=np.int64).view(np.uint64))
    if (~ints).any():
        keys[~ints] = np.fromiter((_str_key(s) for s in arr[~ints]), dtype=np.uint64)
    return keys


class Keyed(NamedTuple):
    """IDs with their keys: ``keys`` (``uint64 [n]``) always, ``ids`` (int64/object ``[n]``)
    when the receiver may need the IDs as given (to store them for rows it creates).

    Where an ID enters Freshet it is hashed once (:func:`keyed`); from there on the key
    travels with it.
    """

    keys: np.ndarray
    ids: np.ndarray | None = None

    def __len__(self) -> int:  # the number of IDs, not the tuple's two fields
        return len(self.keys)

    def take(self, positions: np.ndarray) -> "Keyed":
        """The entries at ``positions``."""
        return Keyed(self.keys[positions], None if self.ids is None else self.ids[positions])


def keyed(ids: "Keyed | Sequence[ID] | np.ndarray", field: str = "id") -> Keyed:
    """``ids`` as :class:`Keyed`: passed through if already keyed, else validated and hashed.

    Raises:
        ValueError: an ID that :func:`validate_id` rejects (naming ``field``).
    """
    if isinstance(ids, Keyed):
        return Keyed(np.asarray(ids.keys, np.uint64), ids.ids)
    arr = as_id_array(ids)
    if arr.dtype == object:
        for x in arr.tolist():
            validate_id(x, field)
    return Keyed(id_keys(arr) if len(arr) else np.empty(0, np.uint64), arr)


def init_rows(keys: np.ndarray, *, seed: int, dim: int, scale: float) -> np.ndarray:
    """Deterministic ``float32`` rows ``U(-scale, scale)`` of shape ``(len(keys), dim)``.

    Each value is a hash of (seed, key, column), so a row depends only on its ID's
    key and the table seed, never on which process creates it or in what order.
    """
    keys = np.asarray(keys, dtype=np.uint64)
    with np.errstate(over="ignore"):
        base = _splitmix64(keys ^ _splitmix64(np.asarray([seed], dtype=np.uint64)))
        cols = np.arange(dim, dtype=np.uint64) * _GOLDEN
        bits = _splitmix64(base[:, None] + cols[None, :])
    unit = (bits >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))  # [0, 1)
    return ((unit * 2.0 - 1.0) * scale).astype(np.float32)


ID_UNION = pa.dense_union([pa.field("int", pa.int64()), pa.field("str", pa.string())])
"""Arrow type of a column that may hold both int and str IDs (a dense union)."""


def ids_to_arrow(ids: Sequence[ID] | np.ndarray, *, union: bool = False) -> pa.Array:
    """IDs as an Arrow array: ``int64`` if all ints, ``string`` if all strings, else :data:`ID_UNION`.

    ``union=True`` always gives :data:`ID_UNION` (one schema for every record of a log),
    after validating each ID: a stored ID that cannot be read back would break every
    later restart.

    Raises:
        ValueError: with ``union``, an ID that :func:`validate_id` rejects.
    """
    arr = as_id_array(ids)
    if union and arr.dtype != np.int64:
        for x in arr.tolist():
            validate_id(x)
    if arr.dtype == np.int64:
        if not union:
            return pa.array(arr, type=pa.int64())
        is_int = np.ones(len(arr), dtype=bool)
    elif all(isinstance(x, str) for x in arr):
        if not union:
            return pa.array(arr.tolist(), type=pa.string())
        is_int = np.zeros(len(arr), dtype=bool)
    else:
        is_int = np.fromiter((isinstance(x, (int, np.integer)) for x in arr), dtype=bool, count=len(arr))
    type_codes = pa.array((~is_int).astype(np.int8))
    offsets = np.empty(len(arr), dtype=np.int32)
    offsets[is_int] = np.arange(int(is_int.sum()), dtype=np.int32)
    offsets[~is_int] = np.arange(int((~is_int).sum()), dtype=np.int32)
    ints = pa.array(arr[is_int].astype(np.int64) if arr.dtype == np.int64 else [int(x) for x in arr[is_int]], type=pa.int64())
    strs = pa.array(list(arr[~is_int]), type=pa.string())
    return pa.UnionArray.from_dense(type_codes, pa.array(offsets), [ints, strs], ["int", "str"])


def ids_from_arrow(col: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """The inverse of :func:`ids_to_arrow`: an ``int64`` or ``object`` numpy array (``int64`` when empty)."""
    if isinstance(col, pa.ChunkedArray):
        col = col.combine_chunks() if col.num_chunks != 1 else col.chunk(0)
    if not len(col):
        return np.empty(0, np.int64)
    if pa.types.is_integer(col.type):
        return col.to_numpy(zero_copy_only=False).astype(np.int64, copy=False)
    return as_id_array(col.to_pylist())
