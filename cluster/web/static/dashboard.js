// duet dashboard: live charts (uPlot) fed by server-sent events; no build step.
// A run's history comes from /api/runs/ID/series once, then /api/runs/ID/stream sends what is new
// (the cursor travels as the event id, so a reconnect continues where it was).
"use strict";

const TERMINAL = ["finished", "failed", "cancelled"];
const ALERT_EVENTS = ["alert", "thermal_pause", "thermal_resume", "oom", "rollback", "error", "oom_recovered"];

function csrf() { return document.querySelector('meta[name="csrf-token"]').content; }

async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin", headers: { Accept: "application/json" } });
  const doc = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(doc.error || r.status + " " + r.statusText);
  return doc;
}

async function postJSON(url, body) {
  const r = await fetch(url, {
    method: "POST", credentials: "same-origin",
    headers: { "Content-Type": "application/json", "X-CSRF-Token": csrf(), Accept: "application/json" },
    body: JSON.stringify(body || {}),
  });
  const doc = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(doc.error || r.status + " " + r.statusText);
  return doc;
}

function fmt(v, digits) {
  if (v === null || v === undefined || Number.isNaN(v)) return "-";
  if (typeof v !== "number") return String(v);
  if (Math.abs(v) >= 1000) return Math.round(v).toLocaleString();
  return v.toPrecision(digits || 4);
}

function tick(v) {
  if (v === null || v === undefined) return "";
  const a = Math.abs(v);
  if (a === 0) return "0";
  if (a >= 1e6) return (v / 1e6).toPrecision(3) + "M";
  if (a >= 1e4) return (v / 1e3).toPrecision(3) + "k";
  if (a < 1e-2) return v.toExponential(1);
  return String(+v.toPrecision(3));
}

function gib(b) { return b === null || b === undefined ? "-" : (b / 2 ** 30).toFixed(2) + " GiB"; }

function el(tag, attrs, text) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  return e;
}

function setField(root, name, text) {
  root.querySelectorAll('[data-field="' + name + '"]').forEach((e) => { e.textContent = text; });
}

// -- charts ---------------------------------------------------------------------------------------

const CHARTS = {
  loss: { title: "loss", series: [["train loss", "#2f6feb"], ["eval loss", "#c01048"]] },
  lr: { title: "learning rate", series: [["lr", "#12805c"]] },
  grad_norm: { title: "gradient norm", series: [["grad norm", "#b54708"]] },
  tps: { title: "tokens/s", series: [["tokens/s", "#7a5af8"]] },
  memory: { title: "memory (GiB)", series: [["process RSS", "#667085"], ["GPU memory (duet)", "#2f6feb"], ["GPU memory (whole card)", "#98a2b3"]] },
  gpu_temp: { title: "GPU temperature (C)", series: [["temperature", "#c01048"]] },
};

function makeChart(box, kind, seriesNames) {
  const spec = CHARTS[kind] || { title: kind, series: [] };
  const names = seriesNames || spec.series;
  box.textContent = "";
  box.appendChild(el("div", { class: "title" }, spec.title));
  const palette = ["#2f6feb", "#c01048", "#12805c", "#b54708", "#7a5af8", "#0e9384", "#667085", "#dd2590"];
  const opts = {
    width: Math.max(300, box.clientWidth - 20), height: 200,
    scales: { x: { time: false } },
    axes: [{ label: "step" }, { size: 60, values: (u, splits) => splits.map(tick) }],
    legend: { live: true },
    series: [{ label: "step" }].concat(names.map(([label, color], i) => ({
      label, stroke: color || palette[i % palette.length], width: 1.5, spanGaps: true,
      points: { show: label === "eval loss" || kind === "eval", size: 5 },
      value: (u, v) => fmt(v),
    }))),
  };
  const data = [[]].concat(names.map(() => []));
  const u = new uPlot(opts, data, box);
  new ResizeObserver(() => u.setSize({ width: Math.max(300, box.clientWidth - 20), height: 200 })).observe(box);
  return u;
}

// -- one run, live ----------------------------------------------------------------------------------

class RunView {
  constructor(runId, root) {
    this.runId = runId;
    this.root = root;
    this.points = [];
    this.evals = [];
    this.events = [];
    this.state = null;
    this.arrivals = [];   // {step, logged_ms, shown_ms}: what the benchmark reads
    this.cursor = { since_step: 0, since_time: null, since_seq: 0, eval_key: null };
    this.charts = {};
    root.querySelectorAll("[data-chart]").forEach((box) => {
      this.charts[box.dataset.chart] = makeChart(box, box.dataset.chart);
    });
  }

  async start() {
    const doc = await getJSON("/api/runs/" + encodeURIComponent(this.runId) + "/series");
    this.apply(doc, false);
    this.readyMs = performance.now();  // ms since the page's navigation began: the history is drawn
    if (!TERMINAL.includes(doc.state) && doc.source !== "workspace") this.listen();
  }

  listen() {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(this.cursor)) if (v !== null && v !== undefined) q.set(k, v);
    const es = new EventSource("/api/runs/" + encodeURIComponent(this.runId) + "/stream?" + q.toString());
    this.es = es;
    setField(this.root, "live", "live");
    es.onmessage = (e) => {
      this.apply(JSON.parse(e.data), true);
      if (!this.note || Date.now() > this.note) setField(this.root, "live", "live");
    };
    es.addEventListener("end", () => { es.close(); setField(this.root, "live", ""); this.ended(); });
    es.addEventListener("trouble", (e) => setField(this.root, "live", "executor not answering: " + JSON.parse(e.data).error));
    es.onerror = () => setField(this.root, "live", "reconnecting ...");
  }

  ended() {
    const page = document.getElementById("run");
    if (page && !page.dataset.reloaded && TERMINAL.includes(this.state)) {
      page.dataset.reloaded = "1";
      setTimeout(() => location.reload(), 1500);  // the report, samples and exports appear with the record
    }
  }

  apply(doc, live) {
    if (doc.reset) {
      this.points = doc.points.slice();
    } else if (doc.points.length) {
      const first = doc.points[0].step;
      while (this.points.length && this.points[this.points.length - 1].step >= first) this.points.pop();
      for (const p of doc.points) this.points.push(p);
    }
    if (doc.eval) this.evals = doc.eval;
    if (doc.events && doc.events.length) this.events = this.events.concat(doc.events);
    if (doc.points.length) {
      const last = doc.points[doc.points.length - 1];
      this.cursor.since_step = last.step;
      this.cursor.since_time = last.time;
    }
    this.cursor.since_seq = doc.next_seq;
    this.cursor.eval_key = doc.eval_key;
    this.state = doc.state;
    this.draw();
    this.show(doc);
    if (live && !doc.reset) {
      const shown = Date.now();
      for (const p of doc.points) this.arrivals.push({ step: p.step, logged_ms: p.time * 1000, shown_ms: shown });
    }
  }

  draw() {
    const pts = this.points;
    const xs = pts.map((p) => p.step);
    const c = this.charts;
    if (c.loss) {
      const ev = new Map(this.evals.map((e) => [e.step, e.eval_loss]));
      const steps = Array.from(new Set(xs.concat(this.evals.map((e) => e.step)))).sort((a, b) => a - b);
      const loss = new Map(pts.map((p) => [p.step, p.loss]));
      c.loss.setData([steps, steps.map((s) => (loss.has(s) ? loss.get(s) : null)),
        steps.map((s) => (ev.has(s) ? ev.get(s) : null))]);
    }
    const col = (key, scale) => pts.map((p) => (p[key] === undefined || p[key] === null ? null : p[key] / (scale || 1)));
    if (c.lr) c.lr.setData([xs, col("learning_rate")]);
    if (c.grad_norm) c.grad_norm.setData([xs, col("grad_norm")]);
    if (c.tps) c.tps.setData([xs, col("tokens_per_second")]);
    if (c.memory) c.memory.setData([xs, col("rss_bytes", 2 ** 30), col("gpu_process_memory_bytes", 2 ** 30),
      col("gpu_memory_used_bytes", 2 ** 30)]);
    if (c.gpu_temp) {
      const temps = col("gpu_temperature_c");
      c.gpu_temp.setData([xs, temps]);
      const box = c.gpu_temp.root.parentNode;
      const none = !temps.some((t) => t !== null);
      let note = box.querySelector(".empty");
      if (none && !note) {
        note = el("div", { class: "empty" }, "no GPU readings: this run trains on the CPU (or NVML is not there)");
        box.appendChild(note);
      }
      c.gpu_temp.root.style.display = none ? "none" : "";
      if (!none && note) note.remove();
    }
  }

  show(doc) {
    const r = this.root;
    const p = doc.progress || {};
    setField(r, "state", doc.state);
    r.querySelectorAll('[data-field="state"]').forEach((e) => { e.className = "badge " + doc.state; });
    setField(r, "step", p.step === undefined ? "-" : p.step);
    if (p.max_steps) setField(r, "max_steps", p.max_steps);
    setField(r, "eta", p.eta_s && !TERMINAL.includes(doc.state) ? "ETA " + Math.round(p.eta_s) + " s" : "-");
    const last = this.points[this.points.length - 1] || {};
    setField(r, "loss", fmt(p.loss !== undefined && p.loss !== null ? p.loss : last.loss));
    const ev = this.evals[this.evals.length - 1];
    setField(r, "eval_loss", fmt(ev ? ev.eval_loss : null));
    setField(r, "tps", fmt(p.tokens_per_second || last.tokens_per_second, 3));
    setField(r, "memory", last.gpu_process_memory_bytes ? gib(last.gpu_process_memory_bytes) + " GPU"
      : gib(last.rss_bytes) + " RSS");
    const gpu = doc.watchdog && doc.watchdog.gpu;
    setField(r, "gpu", gpu ? (fmt(gpu.temperature_c, 3) + " C" + (last.gpu_throttle && last.gpu_throttle.length
      ? ", throttled: " + last.gpu_throttle.join(", ") : "")) : "none");
    setField(r, "active", doc.watchdog ? (doc.watchdog.active.join(", ") || "none") : "-");
    this.showControls(doc.state);
    this.showEvents(doc.events || []);
    this.showCheckpoints(doc.checkpoints);
  }

  showControls(state) {
    const on = { pause: ["training", "preflight", "dry-run"], resume: ["paused"], cancel: ["queued", "preflight", "training", "paused", "dry-run"] };
    document.querySelectorAll("button[data-action]").forEach((b) => { b.disabled = !on[b.dataset.action].includes(state); });
  }

  showEvents(fresh) {
    const tbody = document.getElementById("events");
    const alerts = document.getElementById("alerts");
    for (const e of fresh) {
      const when = new Date(e.time * 1000).toLocaleTimeString();
      const rest = Object.entries(e).filter(([k]) => !["seq", "time", "run_id", "event"].includes(k))
        .map(([k, v]) => k + "=" + (typeof v === "object" ? JSON.stringify(v) : v)).join(" ");
      if (tbody) {
        const tr = el("tr");
        tr.append(el("td", { class: "mono" }, when), el("td", {}, e.event), el("td", { class: "mono" }, rest.slice(0, 400)));
        tbody.prepend(tr);
        while (tbody.children.length > 500) tbody.lastChild.remove();
      }
      if (alerts && ALERT_EVENTS.includes(e.event)) {
        if (alerts.querySelector(".muted")) alerts.textContent = "";
        const tr = el("tr");
        tr.append(el("td", { class: "mono" }, when), el("td", {}, e.rule || e.event),
          el("td", {}, e.message || e.reason || e.error || ""));
        alerts.prepend(tr);
      }
    }
  }

  showCheckpoints(list) {
    const tbody = document.getElementById("checkpoints");
    if (!tbody || !list) return;
    tbody.textContent = "";
    for (const c of list.slice().sort((a, b) => b.step - a.step)) {
      const tr = el("tr");
      tr.append(el("td", { class: "n" }, c.step), el("td", {}, c.valid ? "yes" : "no"), el("td", { class: "mono" }, c.path));
      tbody.append(tr);
    }
  }
}

// -- pages -------------------------------------------------------------------------------------------

function runPage() {
  const root = document.getElementById("run");
  const view = new RunView(root.dataset.run, root);
  window.duetRun = view;
  view.start().catch((e) => setField(root, "live", "not live: " + e.message));
  document.querySelectorAll("button[data-action]").forEach((b) => {
    b.addEventListener("click", async () => {
      const out = document.getElementById("control-error");
      out.textContent = "";
      b.disabled = true;
      try {
        await postJSON("/api/runs/" + encodeURIComponent(view.runId) + "/" + b.dataset.action);
        setField(root, "live", b.dataset.action + " requested (after the current step)");
        view.note = Date.now() + 3000;  // keep the note up a moment
      } catch (e) {
        out.textContent = b.dataset.action + ": " + e.message;
        b.disabled = false;
      }
    });
  });
}

function runsPage() {
  const latest = document.getElementById("latest");
  if (latest) {
    const view = new RunView(latest.dataset.run, latest);
    window.duetRun = view;
    view.start().catch((e) => setField(latest, "live", "not live: " + e.message));
  }
  const box = document.getElementById("runs");
  const btn = document.getElementById("compare-btn");
  const picked = () => Array.from(box.querySelectorAll("input.pick:checked")).map((i) => i.value);
  box.addEventListener("change", () => { btn.disabled = picked().length < 2; });
  btn.addEventListener("click", () => {
    location.href = "/compare?" + picked().map((id) => "run=" + encodeURIComponent(id)).join("&");
  });
  setInterval(async () => {  // the table, as the server renders it (one template), every 3 s
    const keep = new Set(picked());
    const r = await fetch("/runs/table", { credentials: "same-origin" });
    if (!r.ok) return;
    box.innerHTML = await r.text();
    box.querySelectorAll("input.pick").forEach((i) => { i.checked = keep.has(i.value); });
  }, 3000);
}

async function comparePage() {
  const root = document.getElementById("compare");
  if (!root) return;
  const ids = root.dataset.runs.split(",").filter(Boolean);
  const docs = await Promise.all(ids.map((id) => getJSON("/api/runs/" + encodeURIComponent(id) + "/series")
    .catch((e) => ({ run_id: id, error: e.message, points: [], eval: [] }))));
  const join = (tables) => {
    const steps = Array.from(new Set(tables.flatMap((t) => t.map((x) => x[0])))).sort((a, b) => a - b);
    return [steps].concat(tables.map((t) => { const m = new Map(t); return steps.map((s) => (m.has(s) ? m.get(s) : null)); }));
  };
  const names = ids.map((id) => [id]);
  const lossBox = root.querySelector('[data-chart="loss"]');
  const evalBox = root.querySelector('[data-chart="eval"]');
  CHARTS.eval = { title: "eval loss", series: [] };
  const lc = makeChart(lossBox, "loss", names);
  lc.setData(join(docs.map((d) => d.points.map((p) => [p.step, p.loss]))));
  const ec = makeChart(evalBox, "eval", names);
  ec.setData(join(docs.map((d) => (d.eval || []).map((e) => [e.step, e.eval_loss]))));
  const tbody = root.querySelector("#compare-table tbody");
  for (const d of docs) {
    const tr = el("tr");
    const last = d.points[d.points.length - 1] || {};
    const ev = (d.eval || [])[(d.eval || []).length - 1] || {};
    const a = el("a", { href: "/runs/" + encodeURIComponent(d.run_id) }, d.run_id);
    const td = el("td");
    td.append(a);
    tr.append(td, el("td", {}, d.error || d.state), el("td", { class: "n" }, last.step || 0),
      el("td", { class: "n" }, fmt(last.loss)), el("td", { class: "n" }, fmt(ev.eval_loss)));
    tbody.append(tr);
  }
  window.duetCompare = { ids, points: docs.map((d) => d.points.length) };
}

document.addEventListener("DOMContentLoaded", () => {
  const page = document.body.dataset.page;
  if (page === "run") runPage();
  else if (page === "runs") runsPage();
  else if (page === "compare") comparePage();
});
