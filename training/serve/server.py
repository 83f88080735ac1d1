"""Chat sessions on the executor: a model loaded on demand (planned first, refused with the breakdown
when it does not fit beside the training runs there), answers generated in a thread and streamed to
whoever polls (``poll(chat_id, offset)``: a client that reconnects mid-answer picks up where it left),
models unloaded after ``idle_s`` without use.

Generation is one at a time on an executor (one lock): a seed then means the same answer, and two
answers on a CPU's cores would each go at half speed anyway.
"""

from __future__ import annotations

import contextlib
import gc
import json
import math
import os
import re
import threading
import time
import uuid
from pathlib import Path

from infra.run_states import TERMINAL
from training.serve.models import ServeError, ServeRefused, check_messages, check_settings, inference_bytes, \
    inference_total, load, resident_bytes, resolve

IDLE_S = 600.0            # DUET_SERVE_IDLE_S overrides (idle_seconds)
MARGIN = 0.10             # of the device's memory, never planned for
KEEP_CHATS_S = 3600       # a finished answer stays readable this long
MAX_CHATS = 256
KEEP_FILES = 2000         # finished transcripts kept on disk (<data_dir>/chats), newest first
_CHAT_ID = re.compile(r"^[0-9a-f]{16}$")


def idle_seconds() -> float:
    """How long a loaded model may stay unused: DUET_SERVE_IDLE_S, else IDLE_S (ServeError naming the
    variable for anything but a positive number)."""
    raw = os.environ.get("DUET_SERVE_IDLE_S", "").strip()
    if not raw:
        return IDLE_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value <= 0:
        raise ServeError(f"DUET_SERVE_IDLE_S={raw[:40]!r}: give seconds, a number above 0")
    return value


def device_memory(device: str) -> dict:
    """{"total", "free"} bytes of the device a model would be served on, as the system reports them now."""
    if device == "cuda":
        import torch

        free, total = torch.cuda.mem_get_info()
        return {"total": int(total), "free": int(free)}
    import psutil

    vm = psutil.virtual_memory()
    return {"total": int(vm.total), "free": int(vm.available)}


def training_reserved(runs) -> dict[str, dict]:
    """{run id: {"device", "bytes"}} for the runs an executor is training: what their plans said they
    need at their peak (a serving model must leave it to them)."""
    out = {}
    for r in runs:
        if r.state not in TERMINAL:
            est = (r.plan.get("estimate") or {})
            out[r.run_id] = {"device": r.plan.get("device", "cpu"),
                             "bytes": int(est.get("host_bytes") or est.get("whole_run_bytes") or est.get("total_bytes") or 0)}
    return out


class _Chat:
    def __init__(self, chat_id: str, ref: dict, settings: dict, messages: list[dict]):
        self.id, self.ref, self.settings, self.messages = chat_id, ref, settings, messages
        self.text, self.tokens, self.prompt_tokens = "", 0, 0
        self.state, self.error = "queued", None
        self.created = time.time()
        self.started = self.first = self.ended = None
        self.stop = threading.Event()
        self.changed = threading.Condition()   # notified on every new piece and at the end (long polls wait on it)

    def grew(self) -> None:
        with self.changed:
            self.changed.notify_all()

    def view(self, offset: int = 0) -> dict:
        gen_s = (self.ended or time.time()) - self.first if self.first else None
        return {"chat_id": self.id, "model": self.ref["ref"], "run_id": self.ref["run_id"], "kind": self.ref["kind"],
                "settings": self.settings, "state": self.state, "done": self.state in ("done", "failed", "stopped"),
                "error": self.error, "offset": len(self.text), "text": self.text[max(0, int(offset)):],
                "prompt_tokens": self.prompt_tokens, "tokens": self.tokens,
                "queued_s": round(self.started - self.created, 3) if self.started else None,
                "ttft_s": round(self.first - self.started, 3) if self.first and self.started else None,
                "tokens_per_s": round(self.tokens / gen_s, 2) if gen_s and self.tokens > 1 and self.ended else None}


class Pieces:
    """A streamer for ``generate`` that hands on text a token at a time: each new token is decoded
    with the ones since the last piece (a token's text can depend on its neighbours) and held back
    only while the text ends inside a character (U+FFFD). transformers' TextIteratorStreamer holds
    text back to the next space, so a reader sees nothing until a word is whole."""

    def __init__(self, tok, emit):
        self.tok, self.emit = tok, emit
        self.ids: list[int] = []
        self.prefix = self.read = 0
        self.prompt = True

    def _flush(self, final: bool = False) -> None:
        before = self.tok.decode(self.ids[self.prefix:self.read], skip_special_tokens=True)
        now = self.tok.decode(self.ids[self.prefix:], skip_special_tokens=True)
        if len(now) > len(before) and (final or not now.endswith("\ufffd")):
            self.emit(now[len(before):])
            self.prefix, self.read = self.read, len(self.ids)

    def put(self, value) -> None:
        if self.prompt:  # generate's first call carries the prompt
            self.prompt = False
            return
        self.ids.extend(int(x) for x in value.reshape(-1).tolist())
        self._flush()

    def end(self) -> None:
        if self.read < len(self.ids):
            self._flush(final=True)


class ChatServer:
    """Models and chats of one executor. ``reserved()`` says what its training runs hold
    (training_reserved); ``memory(device)`` what the device has (device_memory; tests give a fake)."""

    def __init__(self, data_dir: str | os.PathLike, *, reserved=lambda: {}, memory=device_memory,
                 idle_s: float | None = None):
        self.data_dir = Path(data_dir)
        self.reserved, self.memory = reserved, memory
        self.idle_s = idle_seconds() if idle_s is None else idle_s
        self.models: dict[str, dict] = {}
        self.chats: dict[str, _Chat] = {}
        self._lock = threading.Lock()        # the tables above
        self._gen = threading.Lock()         # one generation at a time
        self._loading = threading.Lock()     # one model load at a time
        self._reaper: threading.Thread | None = None

    # -- planning and loading ---------------------------------------------------------------------

    def plan(self, ref: dict, context_tokens: int) -> dict:
        """The inference estimate for ``ref`` against its device now: ``fits`` and the whole breakdown."""
        need = inference_bytes(ref, context_tokens)
        mem = self.memory(ref["device"])
        training = {k: v["bytes"] for k, v in self.reserved().items() if v["device"] == ref["device"]}
        with self._lock:
            serving = {k: m["bytes"] for k, m in self.models.items() if k != ref["ref"]}
        budget = int(mem["total"] * (1 - MARGIN)) - sum(training.values()) - sum(serving.values())
        total = inference_total(need)
        fits = total <= budget and (ref["ref"] in self.models or total <= mem["free"])
        return {"model": ref["ref"], "device": ref["device"], "context_tokens": context_tokens,
                "needed_bytes": need, "needed_total_bytes": total, "device_total_bytes": mem["total"],
                "device_free_bytes": mem["free"], "margin_bytes": int(mem["total"] * MARGIN),
                "training_reserved_bytes": training, "serving_bytes": serving, "budget_bytes": budget, "fits": fits}

    def _cached(self, ref: dict) -> dict | None:
        with self._lock:
            m = self.models.get(ref["ref"])
        if m is not None:
            m["last"] = time.time()
        return m

    def _model(self, ref: dict, context_tokens: int) -> dict:
        """``ref`` loaded: from the table, else planned and loaded (one load at a time, so two requests
        for a new model load it once)."""
        m = self._cached(ref)
        if m is None:
            with self._loading:
                m = self._cached(ref) or self._load(ref, context_tokens)
        return m

    @contextlib.contextmanager
    def _in_use(self, m: dict):
        """``m`` is answering (the idle reaper leaves it) until the block ends; then it was last used now."""
        with self._lock:
            m["busy"] += 1
        try:
            yield m
        finally:
            m["last"] = time.time()
            with self._lock:
                m["busy"] -= 1

    def _load(self, ref: dict, context_tokens: int) -> dict:
        p = self.plan(ref, context_tokens)
        if not p["fits"]:
            gib = 2**30
            raise ServeRefused(
                f"{ref['ref']} needs {p['needed_total_bytes'] / gib:.2f} GiB on {ref['device']} "
                f"({', '.join(f'{k} {v / gib:.2f}' for k, v in p['needed_bytes'].items())}); "
                f"{p['budget_bytes'] / gib:.2f} GiB is left beside training "
                f"({', '.join(f'{k} {v / gib:.2f}' for k, v in p['training_reserved_bytes'].items()) or 'none'}) "
                f"and served models, {p['device_free_bytes'] / gib:.2f} GiB free now", p)
        model, tok = load(ref)
        m = {"ref": ref, "model": model, "tok": tok, "bytes": resident_bytes(p["needed_bytes"]),
             "loaded": time.time(), "last": time.time(), "busy": 0}
        with self._lock:
            self.models[ref["ref"]] = m
        self._start_reaper()
        return m

    def unload_idle(self, now: float | None = None) -> list[str]:
        """Unload every model unused for ``idle_s`` (none while it answers); the refs unloaded."""
        now = time.time() if now is None else now
        with self._lock:
            gone = [k for k, m in self.models.items() if not m["busy"] and now - m["last"] >= self.idle_s]
            for k in gone:
                del self.models[k]
            old = [c for c, ch in self.chats.items() if ch.ended and now - ch.ended > KEEP_CHATS_S]
            for c in old:
                del self.chats[c]
        if gone:
            gc.collect()
            from training.run.phases import release_memory

            release_memory()
        return gone

    def _start_reaper(self) -> None:
        if self._reaper is not None and self._reaper.is_alive():
            return

        def loop():
            while self.models:
                time.sleep(min(5.0, max(0.05, self.idle_s / 4)))
                self.unload_idle()

        self._reaper = threading.Thread(target=loop, name="duet-serve-reaper", daemon=True)
        self._reaper.start()

    def loaded(self) -> list[dict]:
        with self._lock:
            return [{"model": k, "bytes": m["bytes"], "loaded": m["loaded"], "last_used": m["last"],
                     "device": m["ref"]["device"]} for k, m in self.models.items()]

    # -- chats --------------------------------------------------------------------------------------

    def start(self, run_id: str, model: str, messages: object, settings: object = None) -> dict:
        """Start an answer from ``model`` (a name relative to ``run_id``, see models.py) to ``messages``:
        checked, planned and loaded here (ServeError, ServeRefused), generated in a thread. Returns
        the chat's first view (its ``chat_id`` is what ``poll`` takes)."""
        messages = check_messages(messages)
        settings = check_settings(settings)
        ref = resolve(self.data_dir, run_id, model)
        with self._lock:
            if sum(1 for c in self.chats.values() if not c.ended) >= MAX_CHATS:
                raise ServeRefused(f"{MAX_CHATS} answers are already being generated here", {})
        from training.data.schema import estimate_tokens

        context = estimate_tokens("\n".join(x["content"] for x in messages)) + settings["max_tokens"]
        m = self._model(ref, context)
        enc = self._encode(m, messages, settings)
        chat = _Chat(uuid.uuid4().hex[:16], ref, settings, messages)
        chat.prompt_tokens = int(enc["input_ids"].shape[1])
        with self._lock:
            self.chats[chat.id] = chat
        threading.Thread(target=self._generate, args=(m, chat, enc), name=f"duet-chat-{chat.id}", daemon=True).start()
        return chat.view()

    def _encode(self, m: dict, messages: list[dict], settings: dict):
        from training.data.dataset import for_template

        tok = m["tok"]
        if not getattr(tok, "chat_template", None):
            raise ServeError(f"{m['ref']['ref']}: its tokenizer has no chat template")
        text = tok.apply_chat_template(for_template(tok, messages), add_generation_prompt=True, tokenize=False)
        enc = tok(text, return_tensors="pt", add_special_tokens=False)
        limit = getattr(m["model"].config, "max_position_embeddings", None)
        n = int(enc["input_ids"].shape[1])
        if limit and n + settings["max_tokens"] > limit:
            raise ServeError(f"the conversation is {n} tokens; with max_tokens {settings['max_tokens']} it exceeds "
                             f"the model's context of {limit} tokens")
        return enc

    def _generate(self, m: dict, chat: _Chat, enc) -> None:
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        class _Stop(StoppingCriteria):
            def __call__(self, input_ids, scores, **kw):
                return chat.stop.is_set()

        def emit(piece: str) -> None:
            if chat.first is None:
                chat.first = time.time()
            chat.text += piece
            chat.grew()

        tok, model, s = m["tok"], m["model"], chat.settings
        try:
            with self._in_use(m), self._gen:
                chat.started, chat.state = time.time(), "generating"
                dev = next(model.parameters()).device
                streamer = Pieces(tok, emit)
                kw = {"max_new_tokens": s["max_tokens"], "streamer": streamer,
                      "pad_token_id": tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id,
                      "stopping_criteria": StoppingCriteriaList([_Stop()])}
                kw.update({"do_sample": True, "temperature": s["temperature"], "top_p": s["top_p"]}
                          if s["temperature"] > 0 else {"do_sample": False, "temperature": None, "top_p": None,
                                                       "top_k": None})
                torch.manual_seed(s["seed"])
                with torch.no_grad():
                    ids = model.generate(**{k: v.to(dev) for k, v in enc.items()}, **kw)
                chat.tokens = int(ids.shape[1] - chat.prompt_tokens)
                chat.state = "stopped" if chat.stop.is_set() else "done"
        except Exception as exc:  # noqa: BLE001 - an answer that fails says why; the server goes on
            chat.state, chat.error = "failed", f"{type(exc).__name__}: {exc}"
        finally:
            chat.ended = time.time()
            chat.grew()
            self._save(chat)

    def _save(self, chat: _Chat) -> None:
        """A finished answer, kept on disk for judging later (another process, a restarted actor)."""
        from training.run.run_files import atomic_json

        folder = self.data_dir / "chats"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_json(folder / f"{chat.id}.json", {**chat.view(), "messages": chat.messages})
            old = sorted(folder.glob("*.json"), key=lambda p: p.stat().st_mtime)[:-KEEP_FILES]
            for p in old:
                p.unlink(missing_ok=True)
        except OSError:
            pass  # a full disk costs the transcript, never the answer

    def _find(self, chat_id: object) -> dict:
        """The chat's whole record: in memory, else on disk; ServeError naming the id when neither."""
        cid = str(chat_id)
        with self._lock:
            chat = self.chats.get(cid)
        if chat is not None:
            return {**chat.view(), "messages": chat.messages}
        path = self.data_dir / "chats" / f"{cid}.json"
        if _CHAT_ID.match(cid) and path.is_file():
            try:
                return json.loads(path.read_text())
            except (OSError, ValueError):
                pass
        raise ServeError(f"no chat {cid[:40]!r} here")

    def poll(self, chat_id: str, offset: int = 0, wait_s: float = 0.0) -> dict:
        """The chat's text from ``offset`` on, its state and figures (ServeError for an unknown id).
        ``wait_s`` (at most 5): wait that long for text past ``offset`` or the end (a long poll: the
        piece arrives as it is made, not at the next poll)."""
        with self._lock:
            chat = self.chats.get(str(chat_id))
        off = offset if isinstance(offset, int) and not isinstance(offset, bool) else 0
        if chat is not None:
            wait = min(5.0, float(wait_s)) if isinstance(wait_s, (int, float)) and not isinstance(wait_s, bool) \
                and wait_s > 0 else 0.0
            if wait:
                with chat.changed:
                    chat.changed.wait_for(lambda: len(chat.text) > off or chat.ended is not None, wait)
            return chat.view(off)
        v = {k: x for k, x in self._find(chat_id).items() if k != "messages"}
        return {**v, "text": v["text"][max(0, off):]}

    def transcript(self, chat_id: str) -> dict:
        """The whole chat: its view with the conversation it answered (what a judgement keeps)."""
        return self._find(chat_id)

    def stop(self, chat_id: str) -> dict:
        with self._lock:
            chat = self.chats.get(str(chat_id))
        if chat is None:
            raise ServeError(f"no chat {str(chat_id)[:40]!r} here")
        chat.stop.set()
        return chat.view(len(chat.text))

    # -- held-out prompts and the scores that need no human ---------------------------------------------

    def held_out(self, run_id: str, limit: int = 50) -> list[dict]:
        """The run's test split as prompts with their reference answers (the run's own copy of its
        dataset on this executor): [{id, messages, reference}]."""
        from training.config import PlanError, check_run_id
        from training.data.dataset import load_split, prompt_and_reference

        try:
            check_run_id(run_id)
        except PlanError as exc:
            raise ServeError(str(exc)) from None
        folder = self.data_dir / "runs" / run_id / "dataset"
        if not folder.is_dir():
            raise ServeError(f"no run {run_id!r} on this executor ({self.data_dir / 'runs'})")
        out = []
        for r in load_split(folder, "test")[:max(1, min(int(limit), 500))]:
            msgs, ref = prompt_and_reference(r)
            out.append({"id": r["id"], "messages": msgs, "reference": ref})
        return out

    def scores(self, run_id: str, models: list[str], limit: int = 20) -> dict:
        """Per held-out prompt, each model's mean loss (nats a token) on the reference answer, given
        the prompt: where the run helped and where it did not, with no human in the loop."""
        import torch

        from training.data.dataset import for_template

        if not isinstance(models, list) or not 1 <= len(models) <= 4:
            raise ServeError("scores: give 1 to 4 models")
        prompts = self.held_out(run_id, limit)
        rows = [{"id": p["id"], "prompt": p["messages"][-1]["content"], "loss": {}} for p in prompts]
        names = []
        for name in models:
            ref = resolve(self.data_dir, run_id, name)
            names.append(ref["ref"])
            with self._in_use(self._model(ref, 2048)) as m, self._gen, torch.no_grad():
                tok, model = m["tok"], m["model"]
                dev = next(model.parameters()).device
                for row, p in zip(rows, prompts):
                    head = tok.apply_chat_template(for_template(tok, p["messages"]), add_generation_prompt=True,
                                                   tokenize=False)
                    whole = tok.apply_chat_template(for_template(tok, p["messages"] + [
                        {"role": "assistant", "content": p["reference"]}]), tokenize=False)
                    n_head = len(tok(head, add_special_tokens=False)["input_ids"])
                    ids = tok(whole, return_tensors="pt", add_special_tokens=False)["input_ids"].to(dev)
                    labels = ids.clone()
                    labels[:, :n_head] = -100
                    row["loss"][ref["ref"]] = round(float(model(input_ids=ids, labels=labels).loss), 4) \
                        if ids.shape[1] > n_head else None

        def mean(n: str) -> float | None:
            got = [r["loss"][n] for r in rows if r["loss"].get(n) is not None]
            return round(sum(got) / len(got), 4) if got else None
        return {"run_id": run_id, "models": names, "rows": rows, "mean": {n: mean(n) for n in names}}

    def wait(self, chat_id: str, timeout: float = 600) -> dict:
        """Block until the chat ends (for in-process callers); its whole view."""
        end = time.time() + timeout
        while time.time() < end:
            v = self.poll(chat_id)
            if v["done"]:
                return v
            time.sleep(0.05)
        raise TimeoutError(f"chat {chat_id} did not finish in {timeout:.0f} s")
