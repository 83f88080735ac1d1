// duet dashboard, the Try page: the same message to one or two models, answers streamed side by side
// (server-sent events; the event id is the offset reached, so a reconnect continues the answer),
// then a judgement kept as DPO pairs. Uses getJSON/postJSON/el/fmt from dashboard.js.
"use strict";

function tryPage() {
  const root = document.getElementById("try");
  const runId = root.dataset.run;
  const api = "/api/runs/" + encodeURIComponent(runId);
  const $ = (id) => document.getElementById(id);
  const state = { answers: [], done: 0, kept: null, streams: [] };
  window.duetTry = state;

  function fail(e) { $("try-error").textContent = e.message || String(e); }

  function models() {
    const out = [$("model-a").value];
    const other = $("model-other").value.trim();
    if (other) out.push(other);
    else if ($("model-b").value) out.push($("model-b").value);
    return out;
  }

  function settings() {
    return { temperature: Number($("temperature").value), top_p: Number($("top_p").value),
      max_tokens: Math.round(Number($("max_tokens").value)), seed: Math.round(Number($("seed").value)) };
  }

  function follow(i, view, box) {
    const url = api + "/chat/" + encodeURIComponent(view.chat_id) + "/stream?owner=" + encodeURIComponent(view.owner);
    const es = new EventSource(url);
    state.streams.push(es);
    const text = box.querySelector(".text");
    es.onmessage = (ev) => {
      const d = JSON.parse(ev.data);
      text.textContent += d.text;
      state.answers[i].text = text.textContent;
    };
    es.addEventListener("end", (ev) => {
      es.close();
      const v = JSON.parse(ev.data);
      state.answers[i].state = v.state;
      box.querySelector(".meta").textContent = v.error ? v.error :
        `${v.tokens} tokens, first after ${fmt(v.ttft_s, 3)} s, ${fmt(v.tokens_per_s, 3)} tokens/s; ` +
        `temperature ${v.settings.temperature}, top-p ${v.settings.top_p}, max ${v.settings.max_tokens}, seed ${v.settings.seed}`;
      state.done += 1;
      if (state.done === state.answers.length) finished();
    });
    es.addEventListener("trouble", (ev) => { $("try-status").textContent = JSON.parse(ev.data).error; });
  }

  function finished() {
    $("try-status").textContent = "";
    $("send").disabled = false;
    const ok = state.answers.every((a) => a.state === "done");
    if (!ok) return;
    $("judge").hidden = false;
    const two = state.answers.length > 1;
    $("better-0").hidden = $("better-1").hidden = !two;
    $("both-bad").textContent = two ? "Both bad" : "Edit it";
  }

  async function send() {
    const prompt = $("prompt").value.trim();
    if (!prompt) return;
    $("try-error").textContent = "";
    $("kept").hidden = true;
    $("judge").hidden = true;
    $("edited").hidden = $("keep-edit").hidden = true;
    state.streams.forEach((s) => s.close());
    Object.assign(state, { answers: [], done: 0, kept: null, streams: [] });
    const box = $("answers");
    box.textContent = "";
    $("send").disabled = true;
    $("try-status").textContent = "loading and answering...";
    const msgs = [{ role: "user", content: prompt }];
    const names = models();
    try {
      for (const [i, m] of names.entries()) {
        const col = el("div", { class: "answer", "data-model": m });
        col.append(el("h3", {}, (i ? "B: " : "A: ") + m), el("pre", { class: "text" }), el("p", { class: "muted meta" }));
        box.append(col);
        const view = await postJSON(api + "/chat", { model: m, messages: msgs, settings: settings() });
        state.answers.push({ model: view.model, owner: view.owner, chat_id: view.chat_id, text: "", state: view.state });
        follow(i, view, col);
      }
    } catch (e) {
      fail(e);
      $("send").disabled = false;
      $("try-status").textContent = "";
    }
  }

  async function judge(better, edited) {
    try {
      const body = { answers: state.answers.map((a) => ({ owner: a.owner, chat_id: a.chat_id })), better };
      if (edited !== undefined) body.edited = edited;
      const out = await postJSON(api + "/judge", body);
      state.kept = out;
      const k = out.pairs || out.sft;
      const v = k.version;
      $("kept").textContent = `kept ${k.added} ${out.pairs ? "pair" : "SFT record"}(s) in ${k.name} (${k.records} in all): ` +
        (v ? `version ${v.content_hash.slice(0, 12)}, ${v.counts.train} train / ${v.counts.test} test` : k.why_no_version);
      $("kept").hidden = false;
      $("judge").hidden = true;
    } catch (e) { fail(e); }
  }

  async function heldOut() {
    try {
      const doc = await getJSON(api + "/held-out");
      const box = $("held-out");
      box.textContent = "";
      for (const p of doc.prompts) {
        const b = el("button", { class: "held-out-prompt" }, p.messages[p.messages.length - 1].content.slice(0, 80));
        b.addEventListener("click", () => {
          $("prompt").value = p.messages[p.messages.length - 1].content;
          $("try-status").textContent = "reference: " + p.reference.slice(0, 300);
        });
        box.append(b);
      }
    } catch (e) { fail(e); }
  }

  async function scores() {
    try {
      $("try-status").textContent = "scoring the held-out references...";
      const doc = await postJSON(api + "/scores", { models: models() });
      const t = $("scores");
      const head = t.querySelector("thead tr");
      head.textContent = "";
      head.append(el("th", {}, "held-out prompt"), ...doc.models.map((m) => el("th", {}, m + " loss")));
      const tb = t.querySelector("tbody");
      tb.textContent = "";
      for (const r of doc.rows) {
        const tr = el("tr");
        tr.append(el("td", {}, r.prompt.slice(0, 80)), ...doc.models.map((m) => el("td", { class: "n" }, fmt(r.loss[m]))));
        tb.append(tr);
      }
      const tr = el("tr");
      tr.append(el("th", {}, "mean"), ...doc.models.map((m) => el("th", { class: "n" }, fmt(doc.mean[m]))));
      tb.append(tr);
      t.hidden = false;
      $("try-status").textContent = "";
    } catch (e) { fail(e); $("try-status").textContent = ""; }
  }

  $("send").addEventListener("click", send);
  $("load-held-out").addEventListener("click", heldOut);
  $("score").addEventListener("click", scores);
  $("better-0").addEventListener("click", () => judge(0));
  $("better-1").addEventListener("click", () => judge(1));
  $("both-bad").addEventListener("click", () => { $("edited").hidden = $("keep-edit").hidden = false; });
  $("keep-edit").addEventListener("click", () => judge(null, $("edited").value));
}

document.addEventListener("DOMContentLoaded", () => {
  if (document.body.dataset.page === "try") tryPage();
});
