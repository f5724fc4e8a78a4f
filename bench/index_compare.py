"""Key index micro-benchmark: a Python dict against ``ps.index.KeyIndex``.

``python -m bench.index_compare [--rows 1000000] [--batch 20480] [--rounds 40]`` fills
each index with ``--rows`` random 64-bit keys (slot = position), then runs ``--rounds``
rounds of churn. Each round, on every index in turn and with the same keys:

* remove: evict ``--batch`` random stored keys;
* insert: add as many new keys, so the size stays at ``--rows`` and the index pays for
  its deleted entries and rehashes as they come;
* lookup: a fresh batch of ``--batch`` keys, half stored and half absent.

Fresh keys every round keep the caches as cold as a real stream keeps them, and taking
turns within each round gives every index the same share of whatever else is running.
Times are CPU seconds of this process (every index here runs on one thread). It prints
keys per second, the ratio to the dict, and memory per key: ``nbytes()`` for the index,
``tracemalloc`` for the dict (the dict and its int objects).

The dict is used the way a table used it: ``d.get`` over ``keys.tolist()``, and loops
of ``d[k] = s`` and ``d.pop(k, -1)``. The goal is 10x the dict's keys per second at
1,000,000 rows and 20,480-key batches, at no more than ~30 bytes per key.
"""

from __future__ import annotations

import argparse
import time
import tracemalloc
from typing import Any

import numpy as np

from bench import at_least
from ps.index import KeyIndex

_OPS = ("lookup", "insert", "remove")


class DictIndex:
    """The baseline: ``KeyIndex``'s operations on a Python dict of Python ints."""

    def __init__(self, capacity: int = 0) -> None:
        self.d: dict[int, int] = {}

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        d = self.d
        return np.fromiter((d.get(k, -1) for k in keys.tolist()), dtype=np.int64, count=len(keys))

    def insert(self, keys: np.ndarray, slots: np.ndarray) -> None:
        d = self.d
        for k, s in zip(keys.tolist(), slots.tolist()):
            d[k] = s

    def remove(self, keys: np.ndarray) -> np.ndarray:
        pop = self.d.pop
        return np.fromiter((pop(k, -1) for k in keys.tolist()), dtype=np.int64, count=len(keys))


def run(rows: int, batch: int, rounds: int, seed: int = 0) -> dict[str, dict[str, float]]:
    """``{kind: {"lookup"|"insert"|"remove": keys/s, "bytes/key": bytes}}`` for each index kind."""
    rng = np.random.default_rng(seed)
    keys = rng.integers(0, 2**64, size=rows, dtype=np.uint64)
    kinds: dict[str, Any] = {}
    out: dict[str, dict[str, float]] = {}
    for name, make in (("dict", DictIndex), ("KeyIndex", KeyIndex)):
        tracemalloc.start()
        index = make(rows)
        index.insert(keys, np.arange(rows))
        traced = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        kinds[name] = index
        out[name] = {"bytes/key": (index.nbytes() if isinstance(index, KeyIndex) else traced) / rows}
    spent = {name: dict.fromkeys(_OPS, 0.0) for name in kinds}
    clock = time.process_time
    for r in range(rounds):
        pick = rng.choice(rows, batch, replace=False)
        old, new = keys[pick], rng.integers(0, 2**64, size=batch, dtype=np.uint64)
        slots = np.arange(batch) + r * batch  # any values: neither index checks slots for clashes
        probe = np.concatenate([new[: batch // 2], rng.integers(0, 2**64, size=batch - batch // 2, dtype=np.uint64)])
        rng.shuffle(probe)
        results = []
        for name, index in kinds.items():
            t0 = clock()
            removed = index.remove(old)
            t1 = clock()
            index.insert(new, slots)
            t2 = clock()
            found = index.lookup(probe)
            t3 = clock()
            s = spent[name]
            s["remove"], s["insert"], s["lookup"] = s["remove"] + t1 - t0, s["insert"] + t2 - t1, s["lookup"] + t3 - t2
            results.append((removed, found))
        for removed, found in results[1:]:  # the indexes must agree, or the timings mean nothing
            if not (np.array_equal(removed, results[0][0]) and np.array_equal(found, results[0][1])):
                raise AssertionError(f"round {r}: the indexes disagree")
        keys[pick] = new
    for name in kinds:
        out[name].update({op: batch * rounds / max(spent[name][op], 1e-9) for op in _OPS})
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.index_compare", description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=at_least(1), default=1_000_000)
    ap.add_argument("--batch", type=at_least(1), default=20_480)
    ap.add_argument("--rounds", type=at_least(1), default=40)
    args = ap.parse_args(argv)
    results = run(args.rows, args.batch, args.rounds)
    base = results["dict"]
    print(f"{args.rows:,} keys, batches of {args.batch:,}, {args.rounds} rounds; keys per CPU second (x dict)")
    print(f"{'index':10s}" + "".join(f"{op:>20s}" for op in _OPS) + f"{'bytes/key':>11s}")
    for name, r in results.items():
        cells = "".join(f"{f'{r[op]:.3g} ({r[op] / base[op]:.1f}x)':>20s}" for op in _OPS)
        print(f"{name:10s}{cells}{r['bytes/key']:11.1f}")


if __name__ == "__main__":
    main()
