"""Exact and near-duplicate texts: keys after normalising, and MinHash LSH pairs over all rows at once.

Exact: `normalize` (case folded, runs of whitespace made one space) and a 16-byte blake2b of that is the key.

Near: the Jaccard similarity of two rows' features (`words`: case, punctuation and word order gone, so word
swaps, punctuation and casing edits change nothing), estimated by MinHash and found by LSH banding; a pair
below the threshold still counts when the larger row holds (1 + threshold) / 2 of the smaller one's features
(a sentence or a turn added: the copy is whole inside, at a Jaccard that can be half). Why not datasketch's
`MinHash`/`MinHashLSH`: they hash, insert and query one row at a time in Python, 46-72 us per row measured
here on chatterbot rows, a fifth of what `validate` spends on a row in all (bench/bench_validate.py). Here
every row of a batch is hashed in one numpy pass:
  - each feature is hashed with crc32, and permutation i is the multiply-shift hash
    `(a_i * x + b_i) mod 2**64 >> 32` (a universal family, Dietzfelbinger et al. 1997), applied as one
    (perms, features) array; `np.minimum.reduceat` takes the minima;
  - a word's signature (the minima over its features) is computed once, when the word is first seen, and a
    row's signature is the minimum over its words' signatures: the (rows, perms) signature matrix;
  - LSH: `bands` bands of `rows_per_band` values; in each band rows with the same values share a bucket,
    each bucket's members are paired with its first row (so a bucket of n copies costs n pairs, not n²);
  - every candidate pair is then screened: the share of equal signature values estimates the Jaccard
    similarity J, and the feature counts turn it into containment, |A & B| = J (|A| + |B|) / (1 + J);
  - a pair whose estimate comes within `VERIFY_MARGIN` of either rule is decided on its rows' exact feature
    sets. The estimate alone is biased upwards here: the signature that proposed a pair (a band of equal values)
    is also the one that scores it, and containment magnifies the error when one row is much longer; on the
    quickstart's FAQ it took three distinct answers (exact Jaccard 0.15-0.60) for copies.
The later row of a kept pair is the near-duplicate; the earlier one is what `dedup: near` keeps. Memory is the
signature matrix, 4 bytes per permutation per row (256 B a row at 64), and each row's word ids.
"""

from __future__ import annotations

import hashlib
import re
import zlib
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

NUM_PERM = 64  # the standard error of the estimate at J=0.8 is sqrt(0.8*0.2/64) = 0.05
CANDIDATE_SHARE = 0.6  # LSH proposes pairs from this share of the threshold up (see `banding`)
MIN_CONTAINED = 12  # features the smaller row needs before containment counts: "Hello / Hi" is in many rows
CHECK_PAIRS = 200_000  # candidate pairs compared per numpy pass
VERIFY_MARGIN = 0.15  # estimates this far below a rule still get the exact check: about 3 standard errors at 64
BATCH = 2048  # rows hashed per numpy pass: (words, perms) uint64 arrays of a few MB
_WORD = re.compile(r"\w+")
_MASK32 = np.uint64(0xFFFFFFFF)


def normalize(text: str) -> str:
    """The text exact duplicates are compared by: case folded, whitespace runs made one space, ends stripped.

    Upper-cased before case folding, so a row written in capitals matches in every script (casefold alone
    keeps Turkish dotless "ı" apart from the "i" that "I" folds to).
    """
    return " ".join(text.upper().casefold().split())


def exact_key(text: str) -> bytes:
    """A short key of `normalize(text)`: equal for exact duplicates, 16 bytes whatever the row's length."""
    return hashlib.blake2b(normalize(text).encode("utf-8"), digest_size=16).digest()


def words(text: str) -> set[str]:
    """The features near-duplicates are compared by: the row's case-folded words (punctuation dropped) and the
    4-letter pieces of its words of five letters or more.

    Words alone make a swap of two words, punctuation and casing change nothing; the pieces weigh a long word
    (a content word, mostly) above a short one, so two jokes told on one template ("what do you get when you
    cross a ... and a ...?", word-set Jaccard 0.63) stay apart (0.30) while a copy with a sentence added
    keeps its whole original.
    """
    return {f for w in set(_WORD.findall(text.upper().casefold())) for f in _word_features(w)}


def _word_features(word: str) -> list[str]:
    return [word] + ["#" + word[i:i + 4] for i in range(len(word) - 3)] if len(word) > 4 else [word]  # "#": a piece


def containment_threshold(threshold: float) -> float:
    """How much of the smaller row's features the larger must hold for a pair below `threshold` to count."""
    return (1 + threshold) / 2


def banding(threshold: float, num_perm: int = NUM_PERM) -> tuple[int, int]:
    """(bands, rows per band): the most rows per band (fewest false candidates) that still make a pair at
    Jaccard `CANDIDATE_SHARE * threshold` a candidate with probability >= 0.99, 1 - (1 - J**r)**b. That low,
    because a row with a sentence or a turn added can hold its copy whole at a Jaccard well under the threshold."""
    floor, best = CANDIDATE_SHARE * threshold, (num_perm, 1)
    for r in range(1, num_perm + 1):
        b = num_perm // r
        if 1 - (1 - floor ** r) ** b >= 0.99:
            best = (b, r)
    return best


@dataclass(frozen=True)
class NearPair:
    """Row `later` is a near-duplicate of row `earlier` (indices in the order rows were added)."""

    earlier: int
    later: int
    similarity: float  # Jaccard of the two rows' features
    contained: float  # share of the smaller row's features that the larger holds


class NearIndex:
    """MinHash signatures of rows added one by one (hashed in batches), and their near-duplicate pairs."""

    def __init__(self, threshold: float, seed: int = 0, num_perm: int = NUM_PERM):
        rng = np.random.default_rng(seed)
        self.threshold = threshold
        self.a = rng.integers(1, 2**63, num_perm, dtype=np.uint64) | np.uint64(1)  # odd multipliers
        self.b = rng.integers(0, 2**63, num_perm, dtype=np.uint64)
        self.bands, self.rows_per_band = banding(threshold, num_perm)
        # A row's signature is the minimum over its words' signatures, and each word's (over its features) is
        # computed once: real text repeats its words, so the (perms, features) pass runs over the vocabulary.
        self._vocab: dict[str, int] = {"": 0}  # word -> row of _word_sig; "" stands in for an empty row
        self._word_features: list[int] = [1]  # features per word
        self._new_words: list[str] = [""]
        self._word_hashes: list[tuple[int, ...]] = []  # word id -> its features' crc32s, for the exact check
        self._row_words: list[np.ndarray] = []  # row -> its word ids
        self._word_sig = np.zeros((0, num_perm), dtype=np.uint32)  # (words, perms)
        self._pending: list[int] = []  # word ids of the rows not signed yet, row after row
        self._sizes: list[int] = []  # words per pending row
        self._chunks: list[np.ndarray] = []
        self._empty: list[bool] = []
        self._features: list[int] = []  # features per row (a piece two words share counted twice), for containment

    def __len__(self) -> int:
        return len(self._empty)

    def add(self, text: str) -> int:
        """Add one row; returns its index."""
        vocab, counts = self._vocab, self._word_features
        found = set(_WORD.findall(text.upper().casefold()))
        ids = list(map(vocab.get, found))
        if None in ids:  # words not seen before: the rare path, once per word of the vocabulary
            for w in found:
                if w not in vocab:
                    vocab[w] = len(vocab)
                    counts.append(len(_word_features(w)))
                    self._new_words.append(w)
            ids = list(map(vocab.__getitem__, found))
        self._empty.append(not ids)
        self._features.append(sum(map(counts.__getitem__, ids)))
        self._row_words.append(np.array(ids or [0], dtype=np.int32))
        self._pending += ids or [0]
        self._sizes.append(len(ids) or 1)
        if len(self._sizes) >= BATCH:
            self._flush()
        return len(self._empty) - 1

    def _minhash(self, hashes: np.ndarray, sizes: np.ndarray) -> np.ndarray:
        """(groups, perms) minima of the permuted `hashes`, taken over consecutive groups of `sizes`."""
        permuted = np.empty((len(self.a), len(hashes)), dtype=np.uint64)  # (perms, features), in place
        with np.errstate(over="ignore"):  # multiply-shift hashing wraps around 2**64 by design
            np.multiply(self.a[:, None], hashes, out=permuted)
            permuted += self.b[:, None]
        permuted >>= np.uint64(32)
        starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
        return np.minimum.reduceat(permuted, starts, axis=1).T.astype(np.uint32)

    def _flush(self) -> None:
        if self._new_words:
            features = [[zlib.crc32(f.encode("utf-8")) for f in _word_features(w)] for w in self._new_words]
            self._word_hashes += map(tuple, features)
            flat = np.fromiter((h for fs in features for h in fs), dtype=np.uint64)
            signed = self._minhash(flat, np.array([len(fs) for fs in features]))
            self._word_sig = np.concatenate([self._word_sig, signed])
            self._new_words = []
        if not self._sizes:
            return
        starts = np.concatenate(([0], np.cumsum(self._sizes)[:-1]))
        rows = np.minimum.reduceat(self._word_sig[np.array(self._pending)], starts, axis=0)  # (rows, perms)
        self._chunks.append(rows)
        self._pending, self._sizes = [], []

    def signatures(self) -> np.ndarray:
        """The (rows, perms) signature matrix of every row added so far."""
        self._flush()
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0] if self._chunks else np.zeros((0, len(self.a)), dtype=np.uint32)

    def pairs(self, allowed: Iterable[int] | None = None) -> list[NearPair]:
        """Every (earlier, later) pair at or above the threshold, one per later row (its earliest partner).

        `allowed`: only these rows take part (e.g. the rows left after exact duplicates are taken out).
        """
        sig = self.signatures()
        n = len(sig)
        keep = ~np.array(self._empty, dtype=bool)
        if allowed is not None:
            mask = np.zeros(n, dtype=bool)
            mask[list(allowed)] = True
            keep &= mask
        ids = np.flatnonzero(keep)
        if len(ids) < 2:
            return []
        rng = np.random.default_rng(0)
        mixers = rng.integers(1, 2**63, self.rows_per_band, dtype=np.uint64) | np.uint64(1)
        edges = []
        for band in range(self.bands):
            block = sig[ids, band * self.rows_per_band:(band + 1) * self.rows_per_band].astype(np.uint64)
            with np.errstate(over="ignore"):
                keys = (block * mixers).sum(axis=1)  # one 64-bit key per row and band; collisions are checked below
            order = np.argsort(keys, kind="stable")  # stable: the first of a bucket is its earliest row
            sorted_keys = keys[order]
            starts = np.r_[True, sorted_keys[1:] != sorted_keys[:-1]]
            first = order[np.maximum.accumulate(np.where(starts, np.arange(len(order)), 0))]
            linked = first != order
            edges.append(ids[first[linked]].astype(np.int64) * n + ids[order[linked]])  # (earlier, later) as one int
        codes = np.unique(np.concatenate(edges))
        sizes = np.array(self._features, dtype=np.float64)
        found: list[NearPair] = []
        feature_sets: dict[int, set[int]] = {}
        for start in range(0, len(codes), CHECK_PAIRS):
            chunk = codes[start:start + CHECK_PAIRS]
            earlier, later = chunk // n, chunk % n
            jaccard = (sig[earlier] == sig[later]).mean(axis=1)
            # |A & B| = J (|A| + |B|) / (1 + J): the share of the smaller row found in the larger.
            small = np.minimum(sizes[earlier], sizes[later])
            contained = np.minimum(jaccard * (sizes[earlier] + sizes[later]) / ((1 + jaccard) * small), 1.0)
            near_rule = self._meets(jaccard, contained, small, margin=VERIFY_MARGIN)
            for e, lt in zip(earlier[near_rule], later[near_rule]):
                exact = self._exact(int(e), int(lt), feature_sets)
                if exact is not None:
                    found.append(exact)
        found.sort(key=lambda pair: (pair.later, pair.earlier))
        first: dict[int, NearPair] = {}
        for pair in found:  # each later row's earliest partner
            first.setdefault(pair.later, pair)
        return list(first.values())

    def _meets(self, jaccard, contained, small, margin: float = 0.0):
        """Either rule (Jaccard, or containment of a row large enough), on numbers or on numpy arrays of them."""
        return (jaccard >= self.threshold - margin) | (
            (contained >= containment_threshold(self.threshold) - margin) & (small >= MIN_CONTAINED))

    def _exact(self, earlier: int, later: int, feature_sets: dict[int, set[int]]) -> NearPair | None:
        """The pair, scored on the two rows' feature sets (built once per row in `feature_sets`), if it meets a rule."""
        for r in (earlier, later):
            if r not in feature_sets:
                feature_sets[r] = set().union(*(self._word_hashes[w] for w in self._row_words[r]))
        a, b = feature_sets[earlier], feature_sets[later]
        shared = len(a & b)
        jaccard, small = shared / len(a | b), min(len(a), len(b))
        contained = shared / small
        return NearPair(earlier, later, jaccard, contained) if self._meets(jaccard, contained, small) else None
