"""The context an assistant gets when it resumes a session, within a token budget.

Tiers, in the order they are printed:
1. pinned: the workspace's ``profile.md`` (if any), pinned notes and the session's decisions
   (newest first when they do not all fit), at most 25 % of the budget;
2. summaries of older turns: one extractive line per block of 10 turns (the first sentence of each
   user turn and of the last assistant turn), newest blocks first, in whatever budget is left;
3. retrieved memories relevant to the latest turns: notes and decisions of other sessions, facts and
   hypotheses (search.py, threshold as configured), at most 15 %;
4. the latest turns verbatim, newest kept first, at most 50 % (the last turn always, cut if huge).

Tokens are counted with ``count_tokens`` (a tokenizer's counter when given; otherwise ~4 characters
per token, labelled an estimate). Everything is derived from the event logs and the store contents:
two hosts with the same git history (and the same stores, or none) print byte-identical contexts.
Raw turns stay retrievable: ``duet session show ID --raw --range A:B``.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from memory_sync import views
from memory_sync.search import DEFAULT_THRESHOLD, Doc, default_embedder, search, workspace_docs

DEFAULT_BUDGET = 4096
SHARES = {"pinned": 0.25, "retrieved": 0.15, "recent": 0.50}
BLOCK = 10
_FIRST_SENTENCE = re.compile(r"^(.+?[.!?])(\s|$)", re.S)


def estimate_tokens(text: str) -> int:
    return (len(text) + 3) // 4


def _first_sentence(text: str, width: int = 120) -> str:
    t = " ".join(text.split())
    m = _FIRST_SENTENCE.match(t)
    s = m.group(1) if m else t
    return s if len(s) <= width else s[: width - 1] + "…"


def _search_by_sentence(query: str, docs: list[Doc], threshold: float, embedder) -> list[dict]:
    """Each sentence of the latest turns is a query; a document keeps its best score."""
    best: dict[str, dict] = {}
    for sent in [x for x in re.split(r"(?<=[.!?])\s+|\n+", query) if len(x.split()) >= 3] or [query]:
        for r in search(sent, docs, threshold=threshold, limit=20, embedder=embedder)["results"]:
            if r["source"] not in best or r["score"] > best[r["source"]]["score"]:
                best[r["source"]] = r
    return sorted(best.values(), key=lambda r: (-r["score"], r["source"]))[:20]


def _fit(items: list[str], budget: int, count) -> tuple[list[str], int, int]:
    """Take items in order while they fit; returns (kept, tokens used, how many were left out)."""
    kept, used = [], 0
    for i, it in enumerate(items):
        n = count(it)
        if used + n > budget:
            return kept, used, len(items) - i
        kept.append(it)
        used += n
    return kept, used, 0


def build(workspace: str | os.PathLike, sid: str, *, budget: int = DEFAULT_BUDGET, threshold: float = DEFAULT_THRESHOLD,
          store_docs: list[Doc] | None = None, count_tokens=None, embedder=None) -> dict:
    """Long because the three tiers fill one token budget in order, each reading what the previous left."""
    if budget < 256:
        raise ValueError(f"budget {budget} tokens is too small (at least 256)")
    count = count_tokens or estimate_tokens
    v = views.view(workspace, sid)
    m = v.meta
    header = (f"# Resuming session {m['title']!r} ({v.id}, {v.status}; started on {m['host']} {m['created']}; "
              f"{len(v.events)} events, {len(v.turns())} turns)")
    used = count(header)
    left_out: dict[str, int] = {}

    # 1. pinned
    pinned_items = []
    profile = Path(workspace) / "profile.md"
    if profile.exists():
        pinned_items.append("profile: " + " ".join(profile.read_text(encoding="utf-8").split()))
    pinned_items += [f"pinned note: {e['payload']['text']}" for e in reversed(v.pinned())]
    pinned_items += [f"decision ({e['time'][:10]}): {e['payload']['text']}"
                     + (f" (why: {e['payload']['why']})" if e["payload"].get("why") else "")
                     for e in reversed(v.decisions())]
    if v.next_step():
        pinned_items.insert(0, f"next: {v.next_step()}")
    for b in v.blockers():
        pinned_items.insert(1, f"blocker: {b}")
    pinned, n_pinned, lo = _fit(pinned_items, int(budget * SHARES["pinned"]), count)
    left_out["pinned"] = lo
    used += n_pinned

    # 4. recent turns (decided before summaries so the summaries cover exactly the rest)
    turns = v.turns()
    recent_budget = int(budget * SHARES["recent"])
    recent: list[str] = []
    n_recent = 0
    for t in reversed(turns):
        line = f"[{t['payload']['role']} @ {t['host']} {t['time'][:19]}] {t['payload']['text']}"
        n = count(line)
        if n_recent + n > recent_budget:
            if not recent:  # the last turn always goes in, cut to fit
                line = line[: max(16, recent_budget * 4 - 16)] + " …[cut; see --raw]"
                recent.append(line)
                n_recent += count(line)
            break
        recent.append(line)
        n_recent += n
    recent.reverse()
    used += n_recent
    older = turns[: len(turns) - len(recent)]

    # 3. retrieved memories, relevant to the latest turns
    retrieved: list[str] = []
    n_retrieved = 0
    query = " ".join(t["payload"]["text"] for t in turns[-3:])
    search_info = None
    if query.strip():
        skip = {e["id"] for e in v.pinned() + v.decisions()}
        docs = workspace_docs(workspace, kinds=("note", "decision"), exclude_session=v.id, exclude_ids=skip)
        docs += store_docs or []
        if docs:
            results = _search_by_sentence(query, docs, threshold, embedder)
            search_info = {"embedder": (embedder or default_embedder()).name, "threshold": threshold,
                           "searched": len(docs), "matched": len(results)}
            items = [f"({r['source']}, {r['score']:.2f}) {r['text']}" for r in results]
            retrieved, n_retrieved, left_out["retrieved"] = _fit(items, int(budget * SHARES["retrieved"]), count)
    used += n_retrieved

    # 2. summaries of older turns, newest blocks first, in what is left
    blocks = []
    for start in range(0, len(older), BLOCK):
        blk = older[start:start + BLOCK]
        users = [_first_sentence(t["payload"]["text"]) for t in blk if t["payload"]["role"] == "user"]
        last_a = next((t for t in reversed(blk) if t["payload"]["role"] == "assistant"), None)
        line = f"turns {start + 1}-{start + len(blk)}: asked: " + " | ".join(users or ["-"])
        if last_a:
            line += f" || answered: {_first_sentence(last_a['payload']['text'])}"
        blocks.append(line)
    summaries, n_summ, left_out["summaries"] = _fit(list(reversed(blocks)), max(0, budget - used - 64), count)
    summaries.reverse()
    used += n_summ
    left_out["older_turns_without_summary"] = sum(min(BLOCK, len(older) - i * BLOCK)
                                                  for i in range(len(blocks) - len(summaries)))
    left_out["turns_not_verbatim"] = len(older)

    parts = [header]
    if pinned:
        parts += ["", "## Pinned", *[f"- {x}" for x in pinned]]
    if summaries:
        parts += ["", f"## Earlier (extractive summaries, {len(summaries)} of {len(blocks)} blocks)",
                  *[f"- {x}" for x in summaries]]
    if retrieved:
        parts += ["", "## Related memories", *[f"- {x}" for x in retrieved]]
    parts += ["", f"## Latest turns ({len(recent)} of {len(turns)}, verbatim)", *recent]
    text = "\n".join(parts) + "\n"
    total = count(text)
    return {"session": v.id, "text": text, "tokens": total, "budget": budget,
            "saturation_pct": round(100 * total / budget, 1),
            "token_count": "tokenizer" if count_tokens else "estimate (~4 characters per token)",
            "tiers": {"pinned": len(pinned), "summaries": len(summaries), "retrieved": len(retrieved),
                      "recent_turns": len(recent)},
            "left_out": left_out, "search": search_info}
