"""Pairs of 64-bit perceptual hashes within a Hamming distance, without comparing every pair.

``near_duplicate`` joins two images whose phash (CleanVision's near-duplicate hash, stored by the decode
pass, :mod:`audit.scoring.pixels`) differ in at most ``d`` of their 64 bits. Comparing every pair is
``N^2 / 2`` popcounts (1.25e9 at 50,000 images); this module does it by **multi-index hashing**
(Norouzi, Punjani and Fleet, "Fast search in Hamming space with multi-index hashing", CVPR 2012):
split the 64 bits into ``d + 1`` disjoint bands; two hashes within distance ``d`` agree exactly on at
least one band (pigeonhole), so only hashes sharing a band value are candidates, and each candidate is
verified with a popcount (``np.bitwise_count``). The answer is exact, not approximate.

Why by hand, and not faiss (a dependency already): ``faiss.IndexBinaryMultiHash`` is the same method,
but it cuts the bands from consecutive bits, and a phash's bits are far from uniform (the DC term's bit
is nearly always set, low frequencies are biased), so one band's buckets can hold most of the set: on
50,000 random hashes with 24 of the 64 bits biased or constant, its range search at ``d = 4`` took 44 s,
against 0.3 s here. Here the bands are dealt from the bits sorted by their entropy over the set (a snake
draft), so every band carries a like share of information. Duplicates of one hash are the caller's to
collapse first (``np.unique``), so a blank frame repeated 5,000 times costs one entry, not 12.5 million
pairs. ``faiss.IndexBinaryFlat`` is exact but brute force (N^2). Memory: one band's keys, its sort
order and the pairs found (those within ``d`` only).
"""

from __future__ import annotations

import numpy as np

__all__ = ["HASH_BITS", "hamming", "hamming_pairs"]

HASH_BITS = 64
_ONE = np.uint64(1)


def hamming(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Element-wise Hamming distance of two uint64 arrays (int64)."""
    return np.bitwise_count(np.asarray(a, dtype=np.uint64) ^ np.asarray(b, dtype=np.uint64)).astype(np.int64)


def _band_keys(h: np.ndarray, bands: int) -> list[np.ndarray]:
    """The ``bands`` band values of every hash: disjoint bit sets dealt by entropy, each packed into a uint64."""
    # Bit by bit (64 passes over N), never an (N, 64) matrix: 1.3M reference hashes would make that 650 MiB.
    p = np.array([np.count_nonzero((h >> np.uint64(b)) & _ONE) for b in range(HASH_BITS)]) / max(len(h), 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        ent = -np.nan_to_num(p * np.log2(p)) - np.nan_to_num((1 - p) * np.log2(1 - p))
    order = np.lexsort((np.arange(HASH_BITS), -ent))  # most informative bit first, ties by bit index
    band_of = np.empty(HASH_BITS, dtype=np.int64)
    for r, bit in enumerate(order):
        rnd, pos = divmod(r, bands)
        band_of[bit] = pos if rnd % 2 == 0 else bands - 1 - pos  # snake draft: 0..b-1, b-1..0, ...
    keys = []
    for band in range(bands):
        key = np.zeros(len(h), dtype=np.uint64)
        for j, bit in enumerate(np.flatnonzero(band_of == band)):
            key |= ((h >> np.uint64(bit)) & _ONE) << np.uint64(j)
        keys.append(key)
    return keys


def hamming_pairs(
    hashes: np.ndarray, max_distance: int, side: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every pair of ``hashes`` at Hamming distance ``<= max_distance``, exactly.

    Parameters
    ----------
    hashes : (M,) uint64
        Distinct hashes, best (equal hashes are found too, but a value repeated ``r`` times costs ``r^2``
        comparisons: collapse them with ``np.unique`` first).
    max_distance : int
        ``d`` in 0..63: ``d + 1`` bands.
    side : (M,) bool, optional
        Keep only pairs with one member on each side (a set against a reference set).

    Returns
    -------
    i, j, dist : (P,) int64 each
        ``i < j`` indices into ``hashes``, sorted by ``(i, j)``, and their distances.
    """
    h = np.ascontiguousarray(hashes, dtype=np.uint64)
    m = len(h)
    d = int(max_distance)
    if not 0 <= d < HASH_BITS:
        raise ValueError(f"max_distance must lie in 0..{HASH_BITS - 1}, got {max_distance!r}")
    empty = np.zeros(0, dtype=np.int64)
    if m < 2:
        return empty, empty.copy(), empty.copy()
    found: list[np.ndarray] = []
    for key in _band_keys(h, d + 1):
        order = np.argsort(key, kind="stable")
        ks, hs = key[order], h[order]
        sd = None if side is None else np.asarray(side, dtype=bool)[order]
        # Positions p whose bucket (a run of equal keys in sorted order) reaches p + o; o = 1, 2, ... until no
        # bucket is that long: each round compares every pair o apart inside a bucket, once.
        active = np.arange(m - 1)
        o = 1
        while len(active):
            active = active[ks[active + o] == ks[active]]
            if not len(active):
                break
            cand = active if sd is None else active[sd[active] != sd[active + o]]
            dist = np.bitwise_count(hs[cand] ^ hs[cand + o])
            hit = cand[dist <= d]
            if len(hit):
                a, b = order[hit], order[hit + o]
                found.append(np.minimum(a, b).astype(np.int64) * m + np.maximum(a, b))
            o += 1
            active = active[active + o < m]
    if not found:
        return empty, empty.copy(), empty.copy()
    code = np.unique(np.concatenate(found))  # a pair agreeing on several bands is found once per band
    i, j = code // m, code % m
    return i, j, hamming(h[i], h[j])
