"""Leakage groups and group-wise train/validation/test splits.

Rows that are near-twins (skin-tone variants of one emoji, byte-identical images, the same
caption on two images) share a *group*; a split never cuts a group, so no evaluation image
has a twin in training, and the retrieval datastore can exclude a query's own group.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence

import numpy as np

SPLITS = ("train", "validation", "test")
DEFAULT_FRACTIONS = (0.8, 0.1, 0.1)


class UnionFind:
    """Disjoint sets over ``0..n-1``; ``root`` is the smallest member, so ids are stable."""

    def __init__(self, n: int):
        self.parent = list(range(n))

    def root(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, a: int, b: int) -> None:
        ra, rb = self.root(a), self.root(b)
        if ra != rb:
            self.parent[max(ra, rb)] = min(ra, rb)


def group_rows(n: int, keys: Iterable[Sequence[Hashable | None]]) -> np.ndarray:
    """int32 ``[n]`` group ids: rows sharing any non-empty key (per key kind) are joined.

    ``keys`` yields, for each kind of key (a base emoji, an image hash, a caption ...), a
    sequence of ``n`` values; ``None`` or ``""`` never joins. The group id of a row is the
    smallest row index in its group.
    """
    sets = UnionFind(n)
    for column in keys:
        if len(column) != n:
            raise ValueError(f"a grouping key has {len(column)} values for {n} rows")
        first: dict[Hashable, int] = {}
        for row, key in enumerate(column):
            if key is None or key == "":
                continue
            sets.union(first.setdefault(key, row), row)
    return np.array([sets.root(i) for i in range(n)], np.int32)


def assign_splits(group_ids: Sequence[int], seed: int = 0,
                  fractions: Sequence[float] = DEFAULT_FRACTIONS,
                  names: Sequence[str] = SPLITS) -> list[str]:
    """One split name per row, whole groups at a time, about ``fractions`` of the rows each.

    Groups are visited in a seeded random order and each goes to the split whose share of
    rows (counted at the group's midpoint) it falls in; the result depends only on the
    seed and the group ids, never on row order.
    """
    if len(fractions) != len(names) or any(f < 0 for f in fractions) or sum(fractions) <= 0:
        raise ValueError(f"fractions {tuple(fractions)} must be {len(names)} non-negative "
                         "numbers with a positive sum")
    group_ids = np.asarray(group_ids)
    groups, sizes = np.unique(group_ids, return_counts=True)
    order = np.random.default_rng(seed).permutation(len(groups))
    bounds = np.cumsum(fractions) / np.sum(fractions) * len(group_ids)  # [S]
    split_of_group: dict[int, str] = {}
    filled = 0
    for g in order:
        middle = filled + sizes[g] / 2.0
        split_of_group[int(groups[g])] = names[min(int(np.searchsorted(bounds, middle)),
                                                   len(names) - 1)]
        filled += sizes[g]
    return [split_of_group[int(g)] for g in group_ids]
