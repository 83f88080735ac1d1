"""Trying a run's model on the executor (training/serve): a finished tiny run and its base answer a
conversation, streamed in pieces that add up to what transformers' own generate gives; a checkpoint
answers too; the settings are explicit and recorded; a model that does not fit beside a training run
is refused with the breakdown; an idle model is unloaded; hostile names, conversations and settings
get a clear error."""

import sys
import time

import pytest

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
pytestmark = pytest.mark.integration

PROMPT = [{"role": "user", "content": "Who are you?"}]


@pytest.fixture(scope="module")
def finished(tmp_path_factory, engine_env):
    from tests.runs import run_plan

    tmp = tmp_path_factory.mktemp("serve")
    env = engine_env(tmp)
    state, rec, _ = run_plan(env, "tried", {"max_steps": 4, "checkpoint_every": 2, "eval_every": 4})
    assert state == "finished", rec.get("error")
    return (tmp, *env[:2], "tried", env[2])


def _reference(run_dir, path, messages, max_new_tokens, adapter=None, seed=3):
    """What transformers' generate gives for the served model loaded by hand in the plan's dtype,
    sampling at temperature 1, top-p 0.95 from ``seed`` (a tiny random model's greedy answer is
    blank lines)."""
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[json.loads((run_dir / "spec.json").read_text())["plan"]["dtype"]]
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    enc = tok(text, return_tensors="pt", add_special_tokens=False)
    torch.manual_seed(seed)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0, top_p=0.95,
                             pad_token_id=tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True), \
        int(out.shape[1] - enc["input_ids"].shape[1])


def _stream(server, chat_id, timeout=300):
    """Poll as a client does, from the offset it has: (the pieces, the final view)."""
    pieces, offset, end = [], 0, time.time() + timeout
    while time.time() < end:
        v = server.poll(chat_id, offset)
        if v["text"]:
            pieces.append(v["text"])
        offset = v["offset"]
        if v["done"]:
            return pieces, server.poll(chat_id, 0)
        time.sleep(0.01)
    raise AssertionError("the answer did not finish")


def test_the_run_and_its_base_answer_as_transformers_does(finished):
    from training.serve.server import ChatServer

    tmp, _, ex, run_id, _ = finished
    srv = ChatServer(ex.data_dir)
    sampled = {"temperature": 1.0, "max_tokens": 24, "seed": 3}
    rdir = ex.data_dir / "runs" / run_id
    trained = srv.start(run_id, run_id, PROMPT, sampled)
    pieces, v = _stream(srv, trained["chat_id"])
    assert v["state"] == "done" and v["error"] is None
    assert v["model"] == run_id and v["kind"] == "trained"
    assert v["settings"] == {"temperature": 1.0, "top_p": 0.95, "max_tokens": 24, "seed": 3}
    ref_text, ref_tokens = _reference(rdir, rdir / "merged", PROMPT, 24)
    assert "".join(pieces) == v["text"] == ref_text and v["text"].strip()
    assert v["tokens"] == ref_tokens and v["prompt_tokens"] > 0 and v["ttft_s"] is not None

    base = srv.start(run_id, "base", PROMPT, sampled)
    _, b = _stream(srv, base["chat_id"])
    rec = __import__("json").loads((ex.data_dir / "runs" / run_id / "run.json").read_text())
    assert b["kind"] == "base" and b["text"] == _reference(rdir, rec["model_path"], PROMPT, 24)[0] != v["text"]
    assert {m["model"] for m in srv.loaded()} == {run_id, "base"}

    # the seed decides the answer; greedy decoding is the same as transformers' greedy
    s1 = srv.wait(srv.start(run_id, run_id, PROMPT, {**sampled, "seed": 7})["chat_id"])
    s2 = srv.wait(srv.start(run_id, run_id, PROMPT, {**sampled, "seed": 7})["chat_id"])
    assert s1["text"] == s2["text"] != v["text"] and s1["settings"]["seed"] == 7


def test_a_checkpoint_answers_as_base_plus_its_adapter(finished):
    from training.serve.server import ChatServer

    _, _, ex, run_id, _ = finished
    srv = ChatServer(ex.data_dir)
    v = srv.wait(srv.start(run_id, f"{run_id}@2", PROMPT, {"temperature": 1.0, "max_tokens": 12, "seed": 3})["chat_id"])
    assert v["state"] == "done" and v["model"] == f"{run_id}@2" and v["kind"] == "checkpoint"
    rec = __import__("json").loads((ex.data_dir / "runs" / run_id / "run.json").read_text())
    ckpt = ex.data_dir / "runs" / run_id / "checkpoints" / "checkpoint-2"
    assert v["text"] == _reference(ckpt.parents[1], rec["model_path"], PROMPT, 12, adapter=ckpt)[0] and v["text"].strip()
    latest = srv.wait(srv.start(run_id, f"{run_id}@latest", PROMPT, {"temperature": 0, "max_tokens": 4})["chat_id"])
    assert latest["model"] == f"{run_id}@4"


def test_a_model_that_does_not_fit_beside_training_is_refused_with_the_breakdown(finished):
    from training.serve.models import ServeRefused
    from training.serve.server import ChatServer

    _, _, ex, run_id, _ = finished
    gib = 2**30
    # a fake device (named so): 1 GiB in all, with a training run planned at 0.88 GiB of it
    srv = ChatServer(ex.data_dir, memory=lambda device: {"total": gib, "free": gib // 2},
                     reserved=lambda: {"sft-big": {"device": "cpu", "bytes": int(0.88 * gib)}})
    with pytest.raises(ServeRefused) as err:
        srv.start(run_id, run_id, PROMPT, {"max_tokens": 8})
    b = err.value.breakdown
    assert b["fits"] is False and b["training_reserved_bytes"] == {"sft-big": int(0.88 * gib)}
    assert b["budget_bytes"] < b["needed_total_bytes"] < gib // 2  # it would fit the free memory, not beside training
    assert set(b["needed_bytes"]) == {"weights", "adapter", "kv_cache", "logits", "runtime", "load_transient"}
    assert "sft-big" in str(err.value) and srv.loaded() == []


def test_an_idle_model_is_unloaded(finished):
    from training.serve.server import ChatServer

    _, _, ex, run_id, _ = finished
    srv = ChatServer(ex.data_dir, idle_s=0.5)
    srv.wait(srv.start(run_id, run_id, PROMPT, {"temperature": 0, "max_tokens": 4})["chat_id"])
    end = time.time() + 30
    while srv.loaded() and time.time() < end:
        time.sleep(0.1)
    assert srv.loaded() == []


@pytest.mark.parametrize("model, messages, settings, words", [
    ("../etc", PROMPT, None, "give base, RUN"),
    ("RUN@-1", PROMPT, None, "give base, RUN"),
    ("nosuchrun", PROMPT, None, "no run 'nosuchrun'"),
    ("{run}@3", PROMPT, None, "no valid checkpoint at step 3; steps: 2, 4"),
    ("{run}", [], None, "non-empty list"),
    ("{run}", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}], None, "last message"),
    ("{run}", [{"role": "tool", "content": "x"}], None, "messages[0].role"),
    ("{run}", [{"role": "user", "content": "x", "name": "e"}], None, "exactly the fields"),
    ("{run}", [{"role": "user", "content": "x\x00"}], None, "non-empty text"),
    ("{run}", [{"role": "user", "content": "x" * 200_001}], None, "at most 200000"),
    ("{run}", [{"role": "user", "content": "hi"}, {"role": "system", "content": "s"}, {"role": "user", "content": "u"}],
     None, "system message comes first"),
    ("{run}", PROMPT, {"temperature": float("nan")}, "'temperature'"),
    ("{run}", PROMPT, {"max_tokens": 1e9}, "'max_tokens'"),
    ("{run}", PROMPT, {"max_tokens": True}, "'max_tokens'"),
    ("{run}", PROMPT, {"top_k": 3}, "unknown field 'top_k'"),
    ("{run}", PROMPT, "hot", "expected an object"),
    ("{run}", PROMPT, {"max_tokens": 4096}, "exceeds the model's context"),
])
def test_hostile_requests_get_a_clear_error(finished, model, messages, settings, words):
    from training.serve.models import ServeError
    from training.serve.server import ChatServer

    _, _, ex, run_id, _ = finished
    srv = ChatServer(ex.data_dir)
    with pytest.raises(ServeError, match=__import__("re").escape(words)):
        srv.start(run_id, model.format(run=run_id), messages, settings)
    with pytest.raises(ServeError):
        srv.poll("../../x")


def _compare(srv, run_id, text, seed, models=None):
    """Answers of the run and its base to one message, as a person compares them: their transcripts."""
    msgs = [{"role": "user", "content": text}]
    ids = [srv.start(run_id, m, msgs, {"temperature": 1.0, "seed": seed, "max_tokens": 16})["chat_id"]
           for m in models or (run_id, "base")]
    return [srv.transcript(srv.wait(i)["chat_id"]) for i in ids]


def test_judgements_become_a_versioned_dpo_dataset_that_a_dpo_run_trains_from(finished):
    import json

    from roles import judgements
    from training.data.versions import list_versions
    from training.serve.server import ChatServer

    _, arch, ex, run_id, _ = finished
    srv = ChatServer(ex.data_dir)
    ws = arch.ws.root
    one = _compare(srv, run_id, "Who are you?", 1)
    first = judgements.judge(arch, one, better=0, who="tester@laptop")["pairs"]
    assert first["added"] == 1 and first["version"] is None and "at least 2" in first["why_no_version"]
    assert "judgements: judgements +1" in arch.ws.repo.git.log("-1", "--format=%s")
    assert not arch.ws.repo.git.status("--porcelain", "--", "judgements")  # committed

    # a later process judges by chat id: the executor kept the transcripts on disk
    two = [ChatServer(ex.data_dir).transcript(t["chat_id"]) for t in _compare(srv, run_id, "What do you do?", 2)]
    second = judgements.judge(arch, two, better=1, who="tester@laptop")["pairs"]
    v = second["version"]
    assert second["records"] == 2 and v["counts"]["train"] + v["counts"]["test"] == 2
    mine = [x for x in list_versions(ws) if x["name"] == "judgements"]
    assert [x["content_hash"] for x in mine] == [v["content_hash"]] and mine[0]["kind"] == "dpo"
    assert not arch.ws.repo.git.status("--porcelain", "--", "datasets", "judgements")
    pairs = [json.loads(x) for x in (ws / "judgements/judgements.jsonl").read_text().splitlines()]
    assert pairs[0]["prompt"] == one[0]["messages"] and pairs[0]["chosen"][0]["content"] == one[0]["text"]
    assert pairs[0]["rejected"][0]["content"] == one[1]["text"]
    assert pairs[0]["metadata"]["chosen"]["model"] == run_id and pairs[0]["metadata"]["rejected"]["model"] == "base"
    assert pairs[0]["metadata"]["judged_by"] == "tester@laptop" and pairs[0]["metadata"]["chosen"]["settings"]["seed"] == 1
    assert pairs[1]["chosen"][0]["content"] == two[1]["text"]  # the base's answer won that one

    # both bad: the edit is chosen over each; one answer with an edit is an SFT record
    third = judgements.judge(arch, _compare(srv, run_id, "Say hello.", 3), better=None, edited="Hello!",
                             who="tester@laptop")["pairs"]
    assert third["added"] == 2 and third["records"] == 4
    sft = judgements.judge(arch, _compare(srv, run_id, "Name a colour.", 4, models=(run_id,)), better=None,
                           edited="Blue.", who="tester@laptop")
    assert "pairs" not in sft and sft["sft"]["name"] == "judgements-sft" and sft["sft"]["added"] == 1
    rec = json.loads((ws / "judgements/judgements-sft.jsonl").read_text())
    assert rec["messages"][-1] == {"role": "assistant", "content": "Blue."} and rec["metadata"]["replaces"]["model"] == run_id

    # the newest version trains a DPO run as-is
    ds = third["version"]
    plan = arch.design_plan("demo", ex.probe(), ex.prepare_model("tiny"), "tiny", ds,
                            {"phase": "dpo", "max_steps": 4, "warmup_steps": 1, "checkpoint_every": 4, "eval_every": 4, "micro_batch": 1})
    dpo = ex.submit(arch.submission(plan, ds))
    assert ex.wait(dpo, timeout=600) == "finished", ex.status(dpo)["error"]
    rec = json.loads((ex.data_dir / "runs" / dpo / "run.json").read_text())
    assert rec["phase"] == "dpo" and rec["dataset"]["content_hash"] == ds["content_hash"]


@pytest.mark.parametrize("case, words", [
    ("same", "same text"),
    ("other_conversation", "another conversation"),
    ("better_out_of_range", "better: 5"),
    ("both_bad_no_edit", "give the answer it should have been"),
    ("empty_edit", "edited answer"),
    ("one_answer_no_edit", "one answer"),
])
def test_judgements_that_cannot_be_kept_are_refused_and_nothing_is_written(finished, case, words):
    from roles import judgements
    from training.serve.server import ChatServer

    _, arch, ex, run_id, _ = finished
    srv = ChatServer(ex.data_dir)
    answers = _compare(srv, run_id, "Who are you?", 9)
    better, edited = 0, None
    if case == "same":
        answers = [answers[0], {**answers[1], "text": answers[0]["text"]}]
    elif case == "other_conversation":
        answers = [answers[0], _compare(srv, run_id, "Something else", 9)[1]]
    elif case == "better_out_of_range":
        better = 5
    elif case == "both_bad_no_edit":
        better = None
    elif case == "empty_edit":
        better, edited = None, "   "
    elif case == "one_answer_no_edit":
        answers = answers[:1]
    log = arch.ws.root / "judgements" / "refused.jsonl"
    with pytest.raises(judgements.JudgementError, match=words):
        judgements.judge(arch, answers, better=better, edited=edited, dataset="refused")
    assert not log.exists()


def test_a_secret_in_an_edit_is_refused_and_the_log_is_unchanged(finished):
    from memory_sync.secret_scan import SecretFound
    from roles import judgements
    from training.serve.server import ChatServer

    _, arch, ex, run_id, _ = finished
    answers = _compare(ChatServer(ex.data_dir), run_id, "Who are you?", 11)
    judgements.judge(arch, answers, better=0, dataset="guarded")
    log = arch.ws.root / "judgements" / "guarded.jsonl"
    before = log.read_bytes()
    with pytest.raises(SecretFound):
        judgements.judge(arch, answers, better=None, edited="my key is AKIAZ7QXRWPLMN3VBT4K", dataset="guarded")
    assert log.read_bytes() == before


class ServerSource:
    """The dashboard's Source with the run's executor replaced by a chat server in this process (no
    cluster here; the routes, the guard and the server are the real ones)."""

    def __new__(cls, workspace, server):
        from cluster.web.source import Source

        class _S(Source):
            def _on_executor(self, run_id, method, *args, timeout=0):
                return getattr(server, method)(*args)
        return _S(workspace)


def _asgi(app, method, path, headers, body=b""):
    from tests.asgi import asgi_call

    return asgi_call(app, method, path, headers, body, cut_s=30)


def test_the_try_routes_stream_resume_at_the_offset_and_refuse_with_the_breakdown(finished):
    import json

    from cluster.web import auth
    from cluster.web.app import create_app
    from training.serve.server import ChatServer

    _, arch, ex, run_id, _ = finished
    keys = auth.Keys.from_cluster_token("ef" * 32)
    sessions = auth.Sessions(None)
    cookie = keys.new_session()
    sessions.add(*auth.Keys.parts(cookie))
    h = [(b"host", b"127.0.0.1:8765"), (b"cookie", f"{auth.cookie_name(8765)}={cookie}".encode()),
         (b"x-csrf-token", keys.csrf(keys.session_id(cookie)).encode()), (b"content-type", b"application/json")]
    srv = ChatServer(ex.data_dir)
    app = create_app(ServerSource(arch.ws.root, srv), keys, sessions=sessions)
    body = json.dumps({"model": run_id, "messages": PROMPT, "settings": {"temperature": 1.0, "seed": 4,
                                                                         "max_tokens": 16}}).encode()
    status, out = _asgi(app, "POST", f"/api/runs/{run_id}/chat", h, body)
    assert status == 200, out
    view = json.loads(out)
    whole = srv.wait(view["chat_id"])["text"]
    assert whole.strip()

    def stream(extra):
        status, out = _asgi(app, "GET", f"/api/runs/{run_id}/chat/{view['chat_id']}/stream?owner={run_id}", h + extra)
        assert status == 200, out
        text, ended = "", None
        for block in out.decode().split("\n\n"):
            lines = dict(x.split(": ", 1) for x in block.splitlines() if ": " in x and not x.startswith(":"))
            if lines.get("event") == "end":
                ended = json.loads(lines["data"])
            elif "data" in lines:
                text += json.loads(lines["data"])["text"]
        return text, ended

    text, ended = stream([])
    assert text == whole and ended["state"] == "done"
    k = len(whole) // 2
    again, ended = stream([(b"last-event-id", str(k).encode())])  # a browser that reconnects mid-answer
    assert again == whole[k:] and ended["tokens"] == 16 and ended["settings"]["seed"] == 4

    # what the browser may send is checked before anything runs
    for bad, words in ((b'{"model": 3, "messages": []}', b"model: expected str"),
                       (b'{"model": "base", "messages": [], "x": 1}', b"unknown field"),
                       (b'{"model": "base", "messages": [{"role": "user", "content": "hi"}], "settings": {"seed": -1}}',
                        b"'seed'")):
        status, out = _asgi(app, "POST", f"/api/runs/{run_id}/chat", h, bad)
        assert status == 400 and words in out, (status, out)
    status, out = _asgi(app, "POST", f"/api/runs/{run_id}/judge", h,
                        json.dumps({"answers": [{"owner": run_id, "chat_id": "../../etc"}], "better": 0}).encode())
    assert status == 400 and b"16 hexadecimal digits" in out

    # a model that does not fit beside a training run: 409 with the breakdown
    srv.reserved = lambda: {"sft-big": {"device": "cpu", "bytes": 10**15}}
    status, out = _asgi(app, "POST", f"/api/runs/{run_id}/chat", h,
                        json.dumps({"model": "base", "messages": PROMPT}).encode())
    doc = json.loads(out)
    assert status == 409 and doc["breakdown"]["training_reserved_bytes"] == {"sft-big": 10**15}
    srv.reserved = lambda: {}


def test_duet_chat_interactive_compares_and_keeps_the_judgement_without_a_cluster(finished):
    import json
    import subprocess

    _, arch, ex, run_id, _ = finished
    ws = arch.ws.root
    r = subprocess.run([sys.executable, "-m", "cluster.cli", "chat", run_id, "--compare", "base", "--temperature", "1",
                        "--max-tokens", "8", "--dataset", "typed", "--data-dir", str(ex.data_dir), "--workspace", str(ws)],
                       input="Who are you?\n2\nAnd what do you do?\n\n", capture_output=True, text=True, timeout=300,
                       cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert r.returncode == 0, r.stderr[-3000:]
    said = r.stdout + r.stderr  # the answers on stdout, the labels and what was kept on stderr
    assert f"{run_id}:" in said and "base:" in said and "kept 1 pair(s) in typed" in said and "you> " in r.stdout
    pair = json.loads((ws / "judgements" / "typed.jsonl").read_text())
    assert pair["metadata"]["chosen"]["model"] == "base" and pair["prompt"][-1]["content"] == "Who are you?"
    bad = subprocess.run([sys.executable, "-m", "cluster.cli", "chat", run_id, "--prompt", "hi", "--max-tokens", "0",
                          "--data-dir", str(ex.data_dir), "--workspace", str(ws)], capture_output=True, text=True,
                         timeout=120, cwd=str(__import__("pathlib").Path(__file__).resolve().parents[2]))
    assert bad.returncode == 1 and "max-tokens" in bad.stderr and "Traceback" not in bad.stderr


def test_a_qlora_run_answers_from_its_4bit_base_with_the_adapter_as_trained(tmp_path_factory, engine_env):
    from tests.runs import run_plan
    from training.serve.models import inference_bytes, resolve
    from training.serve.server import ChatServer

    env = engine_env(tmp_path_factory.mktemp("serve-qlora"))
    state, rec, d = run_plan(env, "q4", {"method": "qlora", "max_steps": 2, "warmup_steps": 1, "checkpoint_every": 2,
                                         "eval_every": 2})
    assert state == "finished", rec.get("error")
    ex = env[1]
    ref = resolve(ex.data_dir, "q4", "q4")
    assert ref["kind"] == "trained" and ref["adapter"].endswith("adapter") and ref["method"] == "qlora"
    full = resolve(ex.data_dir, "q4", "base")
    assert inference_bytes(ref, 64)["weights"] < inference_bytes({**full, "method": "lora"}, 64)["weights"]  # nf4
    srv = ChatServer(ex.data_dir)
    v = srv.wait(srv.start("q4", "q4", PROMPT, {"temperature": 1.0, "max_tokens": 8, "seed": 1})["chat_id"])
    assert v["state"] == "done" and v["tokens"] > 0, v["error"]
    model = srv.models["q4"]["model"]
    assert any("4bit" in type(m).__name__ for m in model.modules()) and hasattr(model, "peft_config")
