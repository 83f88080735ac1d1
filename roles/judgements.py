"""A person's judgements of answers, kept as training data (architect side).

Answers to the same conversation, compared: the better one against each other one is a preference
pair (DPO: prompt, chosen, rejected); "both bad" with an edited answer makes the edit the chosen
answer against each. One answer with an edit (a thumbs-down fixed by hand) is an SFT record.

Every judgement is appended to ``judgements/<name>.jsonl`` in the workspace (pairs) or
``judgements/<name>-sft.jsonl`` (SFT records) and committed; from that log a new dataset version of
``<name>`` (or ``<name>-sft``) is cut each time, as ``duet data curate`` would: versioned, hashed,
split, committed, usable as-is by ``phase: dpo``. Until the log splits (two records, a test one
among them) only the log is written and the answer says so. The answers' texts come from the
executor (its chat records), never from the client that asks.
"""

from __future__ import annotations

import hashlib
import json
import time

from training.data.dataset import check_name
from training.data.schema import DatasetError, Record, check_record

MAX_EDIT_CHARS = 100_000


class JudgementError(ValueError):
    """A judgement that cannot be kept (exit 1): it names what is wrong."""


def _answer_msg(text: str) -> list[dict]:
    return [{"role": "assistant", "content": text}]


def records_for(answers: list[dict], better: int | None, edited: str | None, who: str, when: float | None = None
                ) -> tuple[list[dict], list[dict]]:
    """(preference pairs, SFT records) for a judgement of ``answers`` (chat transcripts: messages,
    text, model, run_id, settings, chat_id). ``better``: the index of the better answer, or None for
    "both bad" (then ``edited`` is required)."""
    when = time.time() if when is None else when
    if not answers:
        raise JudgementError("a judgement needs at least one answer")
    msgs = answers[0]["messages"]
    for i, a in enumerate(answers):
        if a.get("state") != "done":
            raise JudgementError(f"answer {i + 1} ({a.get('model')}) is {a.get('state')}; judge finished answers")
        if a["messages"] != msgs:
            raise JudgementError(f"answer {i + 1} answers another conversation; compare answers to the same one")
    if edited is not None:
        if not isinstance(edited, str) or not edited.strip() or len(edited) > MAX_EDIT_CHARS or "\x00" in edited:
            raise JudgementError(f"edited answer: expected non-empty text of at most {MAX_EDIT_CHARS} characters")
        edited = edited.strip()
    if better is not None and (isinstance(better, bool) or not isinstance(better, int)
                               or not 0 <= better < len(answers)):
        raise JudgementError(f"better: {better!r}; give 1..{len(answers)} (or none, with an edited answer)")
    if better is None and edited is None:
        raise JudgementError("both bad: give the answer it should have been (an edit) to keep anything")
    if len(answers) == 1 and better is not None and edited is None:
        raise JudgementError("one answer: a judgement keeps an edit of it (or compare two answers)")
    meta = {"source": "judgement", "judged_by": who, "judged_at": round(when, 3), "run_id": answers[0]["run_id"]}

    def rid(*parts: str) -> str:
        return "judge-" + hashlib.sha256(json.dumps([msgs, *parts, when], sort_keys=True).encode()).hexdigest()[:16]

    pairs, sft = [], []
    if len(answers) == 1:
        a = answers[0]
        sft.append({"id": rid(a["text"], edited), "messages": msgs + _answer_msg(edited),
                    "metadata": {**meta, "replaces": {**_source(a), "text": a["text"]}}})
    else:
        chosen_text = edited if edited is not None else answers[better]["text"]
        chosen_from = {"model": "edited by hand"} if edited is not None else _source(answers[better])
        if edited is not None and better is not None:
            chosen_from["edited_from"] = answers[better]["model"]
        for a in answers:
            if a["text"].strip() == chosen_text.strip():
                continue  # the chosen answer itself, or one with the same text: no preference between them
            pairs.append({"id": rid(chosen_text, a["text"]), "prompt": msgs, "chosen": _answer_msg(chosen_text),
                          "rejected": _answer_msg(a["text"]),
                          "metadata": {**meta, "chosen": chosen_from, "rejected": _source(a)}})
        if not pairs:
            raise JudgementError("the answers are the same text: there is no preference to keep")
    for r in pairs + sft:
        problems = check_record(Record("judgement", 1, r, ""))
        if problems:
            raise JudgementError("; ".join(f"{p.field}: {p.message}" for p in problems))
    return pairs, sft


def _source(answer: dict) -> dict:
    """Where an answer came from, as a record's metadata keeps it."""
    return {"model": answer["model"], "settings": answer["settings"], "chat_id": answer["chat_id"]}


def keep(arch, name: str, records: list[dict]) -> dict:
    """Append ``records`` to the workspace's judgement log ``name`` (secrets refused first), commit it,
    and cut a new version of dataset ``name`` from the whole log when it splits. Returns what was
    written: the log, its record count, and the version (or why there is none yet)."""
    from memory_sync.secret_scan import SecretFound, scanner

    check_name(name)
    log = arch.ws.root / "judgements" / f"{name}.jsonl"
    lines = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True) + "\n" for r in records)
    found = scanner(arch.ws.root).scan_text(lines, str(log.relative_to(arch.ws.root)))
    if found:
        raise SecretFound(found, action=f"refusing to keep the judgement in {name}")
    arch.ws.init()
    log.parent.mkdir(parents=True, exist_ok=True)
    before = log.read_bytes() if log.exists() else b""
    with open(log, "ab") as fh:
        fh.write(lines.encode("utf-8"))
    n = before.count(b"\n") + len(records)
    out = {"name": name, "log": str(log.relative_to(arch.ws.root)), "records": n, "added": len(records)}
    try:
        try:
            v = arch.curate([str(log)], name)
        except DatasetError as exc:
            out["version"], out["why_no_version"] = None, str(exc)
        else:
            out["version"] = {**v, "counts": v["manifest"]["counts"]}
        out["commit"] = arch.commit([log], f"judgements: {name} +{len(records)} ({n} in all)")
    except BaseException:
        log.write_bytes(before)  # nothing half-kept: the log is as it was
        raise
    arch.log("state", {"step": "judgement", "name": name, "added": len(records), "records": n,
                       "version": (out["version"] or {}).get("content_hash")})
    return out


def judge(arch, answers: list[dict], *, better: int | None, edited: str | None = None, dataset: str = "judgements",
          who: str = "") -> dict:
    """A judgement of ``answers`` kept: pairs into ``dataset``, an SFT record into ``<dataset>-sft``."""
    pairs, sft = records_for(answers, better, edited, who)
    out = {}
    if pairs:
        out["pairs"] = keep(arch, dataset, pairs)
    if sft:
        out["sft"] = keep(arch, f"{dataset}-sft", sft)
    return out
