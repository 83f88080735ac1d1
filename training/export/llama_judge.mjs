// llama.cpp as the judge of a GGUF export: the prebuilt CPU binary of node-llama-cpp (the same
// llama.cpp code Ollama and LM Studio load GGUF files with). Read by training/export/llama_judge.py.
//
// stdin: {model, lora?: {base, adapter}, threads, topk, texts: [str], chat?: {template, bos, eos,
//         conversations: [[{role, content}]]}, sequences: [{ids: [int], prompt: int, generate: int}]}
// stdout: one JSON document: {llama_cpp, tokens: [[int]], rendered: [str | {error}],
//         sequences: [{top: [[[id, p], ...] per position], greedy: [int]}], lora: same as sequences}
// argv[2]: the folder whose node_modules holds node-llama-cpp (duet installs it apart from this file).
import fs from "node:fs";
import path from "node:path";
import {pathToFileURL} from "node:url";

const req = JSON.parse(fs.readFileSync(0, "utf8"));
const root = path.join(process.argv[2], "node_modules", "node-llama-cpp");
const pkg = JSON.parse(fs.readFileSync(path.join(root, "package.json"), "utf8"));
const {getLlama} = await import(pathToFileURL(path.join(root, pkg.exports?.["."]?.import ?? "dist/index.js")).href);
let info = {};
try { info = JSON.parse(fs.readFileSync(path.join(root, "llama", "llama.cpp.info.json"), "utf8")); } catch (e) { /* older layout */ }
const llama = await getLlama({gpu: false, build: "never", logLevel: "error"});
// temperature 1, truncated to llama.cpp's own top k: the probabilities are the softmax of llama.cpp's
// logits over its k most likely tokens (the full vocabulary's map costs ~0.25 s a position at 262k tokens)
const plain = {temperature: 1, topK: req.topk, topP: 1, minP: 0};

async function score(modelPath, loraPath) {
  const model = await llama.loadModel({modelPath});
  const longest = Math.max(16, ...req.sequences.map((s) => s.ids.length + (s.generate || 0)));
  const ctx = await model.createContext({contextSize: longest + 16, sequences: 1, threads: req.threads,
                                         ...(loraPath ? {lora: {adapters: [{filePath: loraPath, scale: 1}]}} : {})});
  const seq = ctx.getSequence();
  const out = [];
  for (const s of req.sequences) {
    await seq.clearHistory();
    const res = await seq.controlledEvaluate(s.ids.map((t) => [t, {generateNext: {probabilities: true, options: plain}}]));
    const top = res.map((r) => Array.from(r.next.probabilities.entries()).slice(0, req.topk));
    const greedy = [];
    if (s.generate) {
      await seq.clearHistory();
      const prompt = s.ids.slice(0, s.prompt);
      const next = {generateNext: {token: true, options: {temperature: 0}}};
      let r = await seq.controlledEvaluate(prompt.map((t, i) => (i === prompt.length - 1 ? [t, next] : t)));
      let tok = r[prompt.length - 1].next.token;
      while (greedy.length < s.generate) {
        greedy.push(tok);
        if (greedy.length === s.generate) break;
        r = await seq.controlledEvaluate([[tok, next]]);
        tok = r[0].next.token;
      }
    }
    out.push({top, greedy});
  }
  const tokens = loraPath ? [] : (req.texts || []).map((t) => Array.from(model.tokenize(t, true)));
  await ctx.dispose();
  await model.dispose();
  return {out, tokens};
}

const result = {llama_cpp: info.tag || info.release || null, node_llama_cpp: pkg.version, rendered: []};
const main = await score(req.model, null);
result.tokens = main.tokens;
result.sequences = main.out;
if (req.lora) result.lora = (await score(req.lora.base, req.lora.adapter)).out;
for (const conv of (req.chat ? req.chat.conversations : [])) {
  try {
    const r = new llama._bindings.AddonJinjaRenderer(req.chat.template);
    result.rendered.push(r.render({messages: conv, add_generation_prompt: true, bos_token: req.chat.bos || "",
                                   eos_token: req.chat.eos || ""}));
  } catch (e) {
    result.rendered.push({error: String(e && e.message ? e.message : e)});
  }
}
process.stdout.write(JSON.stringify(result));
await llama.dispose();
