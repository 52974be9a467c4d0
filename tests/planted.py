"""A generated two-source corpus with planted exact and near duplicates, and its ground truth.

Used by tests/test_prepare.py and bench/dedup.py. Documents are random words of a random
vocabulary (unrelated documents share almost no character 13-gram). An original may get a copy in
the *other* source with a share `rate` of its words replaced by other words; the ground truth is
the exact Jaccard similarity of the two documents' shingle sets, so recall and precision can be
measured at any threshold.
"""

from __future__ import annotations

import json
import random
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from slimpajama.data.prepare import clean_text, shingles
from slimpajama.data.reader import write_jsonl_zst

SOURCES = ("books", "web")  # sorted: books/ is read first


@dataclass
class Planted:
    """Documents in processing order (sorted files, then lines) with their group; copies share a group."""

    texts: list[str] = field(default_factory=list)
    sources: list[str] = field(default_factory=list)
    groups: list[int] = field(default_factory=list)
    rates: list[float] = field(default_factory=list)  # share of words changed (0: original or exact copy)

    def true_similarity(self, ngram: int = 13, unit: str = "char") -> list[float]:
        """For each document, its highest exact Jaccard similarity with an EARLIER document of its group."""
        sets = [shingles(clean_text(unicodedata.normalize("NFC", t)), ngram, unit) for t in self.texts]
        best, seen = [], {}
        for i, g in enumerate(self.groups):
            best.append(max((len(sets[i] & sets[j]) / max(1, len(sets[i] | sets[j])) for j in seen.get(g, [])),
                            default=0.0))
            seen.setdefault(g, []).append(i)
        return best


def make_planted(directory: Path, n_originals: int = 200, rates: tuple = (0.01, 0.02, 0.03), exact: int = 20,
                 related: tuple = (0.10, 0.15), n_related: int = 20, seed: int = 0) -> Planted:
    """Write books/part-0.jsonl.zst and web/part-0.jsonl under `directory`.

    n_originals unrelated documents (120-400 words) go to a random source; one in two gets a near copy
    (rate drawn from `rates`) in the other source, `exact` get an exact copy there, and `n_related` get
    a copy with a rate from `related` (well below a 0.8 threshold: these must be kept).
    """
    rng = random.Random(seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9)))
             for _ in range(5000)]
    docs: dict[str, list[tuple[str, int, float]]] = {s: [] for s in SOURCES}
    for g in range(n_originals):
        words = [rng.choice(vocab) for _ in range(rng.randint(120, 400))]
        home = rng.choice(SOURCES)
        other = SOURCES[1 - SOURCES.index(home)]
        docs[home].append((" ".join(words) + ".", g, 0.0))
        k = g // 2
        if g % 2 == 0:
            rate = rng.choice(rates)
        elif k < exact:
            rate = 0.0
        elif k < exact + n_related:
            rate = rng.choice(related)
        else:
            continue
        copy = list(words)
        for i in rng.sample(range(len(words)), max(1, round(rate * len(words))) if rate else 0):
            copy[i] = rng.choice(vocab)
        docs[other].append((" ".join(copy) + ".", g, rate))
    planted = Planted()
    directory.mkdir(parents=True, exist_ok=True)
    for source in SOURCES:
        rng.shuffle(docs[source])
        for text, g, rate in docs[source]:
            planted.texts.append(text)
            planted.sources.append(source)
            planted.groups.append(g)
            planted.rates.append(rate)
        (directory / source).mkdir(exist_ok=True)
        pairs = [(t, source) for t, _, _ in docs[source]]
        if source == "books":
            write_jsonl_zst(str(directory / source / "part-0.jsonl.zst"), pairs)
        else:
            (directory / source / "part-0.jsonl").write_text(
                "".join(json.dumps({"text": t, "meta": {"redpajama_set_name": s}}) + "\n" for t, s in pairs))
    return planted


def recall_precision(planted: Planted, removed: list[bool], threshold: float, similarity: list[float] | None = None):
    """Recall over documents whose true similarity to an earlier group member is >= threshold, and
    precision over removed documents (a removal is right when that similarity is >= threshold)."""
    sim = similarity if similarity is not None else planted.true_similarity()
    positives = [s >= threshold for s in sim]
    tp = sum(p and r for p, r in zip(positives, removed))
    return tp / max(1, sum(positives)), tp / max(1, sum(removed)), sum(positives), sum(removed)
