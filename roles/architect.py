"""The architect's logic (no Ray, no torch): curate datasets, design plans, record runs, all
committed to the workspace git and mirrored to memory. ``roles.actors.ArchitectActor`` wraps it.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import secrets
import shutil
from pathlib import Path

import yaml

from memory_sync.memory import Memory
from memory_sync.secret_scan import SecretFound, scanner
from memory_sync.workspace import Workspace
from training.data.curate import build_version
from training.data.dataset import check_name
from training.data.schema import input_file
from training.run.executor import RECORD_FILES
from training.plan.hardware import HardwareProfile
from training.plan.memory_model import ModelProfile
from training.config import TrainConfig, check_run_id, load_config
from training.plan.plan_phases import phase_ratios
from training.plan.planner import make_plan


class Architect:
    """The workspace and its session are created on first use (a commit or a log), so an input
    refused before that leaves no new repository and no session behind. Texts the architect logs by
    itself are mirrored with secrets redacted; files it commits are refused when they hold one."""

    def __init__(self, workspace: str, postgres_url: str | None = None, mongo_url: str | None = None,
                 session_title: str | None = None, session_id: str | None = None):
        self.ws = Workspace(workspace)
        self.memory = Memory(self.ws.root, postgres_url, mongo_url, redact_secrets=True)
        self._session = None
        self._session_ref = session_id
        self._session_title = session_title or "work session"
        self.seen_events: dict[str, int] = {}
        self.last_publish_error: str | None = None

    @property
    def session(self):
        if self._session is None:
            self.ws.init()
            self._session = (self.memory.session(self._session_ref) if self._session_ref else
                             self.memory.start_session(self._session_title, ["duet"]))
        return self._session

    def commit(self, paths: list, message: str, tag: str | None = None) -> str | None:
        """Commit (and tag), then publish to the workspace remote when there is one (a failure is
        logged, not fatal: the commit stays local and goes out with the next publish)."""
        self.ws.init()
        sha = self.ws.commit(paths, message)
        if sha and tag:
            self.ws.tag(tag, message)
        if sha and self.ws.has_remote():
            try:
                self.ws.publish()
            except Exception as exc:  # offline laptop: keep working, push later
                self.last_publish_error = str(exc)
        return sha

    @property
    def session_id(self) -> str:
        return self.session.id

    def log(self, kind: str, payload: dict) -> dict:
        return self.memory.log(self.session, kind, payload)

    def curate(self, files: list[str], name: str, test_frac: float = 0.1, seed: int = 0, *, strict: bool = True,
               **kw) -> dict:
        """Check + split + version a dataset, commit it. ``strict``: bad input writes nothing; else
        invalid records are quarantined with their reasons. Inputs are scanned for secrets first
        (SecretFound, nothing written); a refused commit removes the version folder it wrote."""
        check_name(name)
        paths = [input_file(f) for f in files]
        sc = scanner(self.ws.root)
        found = [x for p in paths for x in sc.scan_file(p)]
        if found:
            raise SecretFound(found, action=f"refusing to curate {name}")
        existed = self.ws.root.exists()
        v = build_version(paths, self.ws.root / "datasets", name, test_frac=test_frac, seed=seed, strict=strict, **kw)
        c = v.manifest["counts"]
        try:
            sha = self.commit([v.path], f"dataset: {name} {v.content_hash[:12]} ({c['train']} train, {c['test']} test)")
        except BaseException:
            if not existed:
                shutil.rmtree(self.ws.root, ignore_errors=True)
            elif not self.ws.repo.git.ls_files("--", str(v.path)):
                shutil.rmtree(v.path, ignore_errors=True)
            raise
        self.log("state", {"step": "dataset", "name": name, "content_hash": v.content_hash, "counts": c,
                           "path": str(v.path.relative_to(self.ws.root)), "commit": sha})
        return {"name": name, "content_hash": v.content_hash, "path": str(v.path), "manifest": v.manifest,
                "commit": sha}

    def curate_uploaded(self, uploads: dict[str, bytes], name: str, test_frac: float = 0.1, seed: int = 0,
                        **kw) -> dict:
        """``curate`` for files sent by a client that shares no filesystem with this host: they are
        written under ``uploads/<name>/`` (basename only) first; error messages name those files."""
        check_name(name)
        bases = {}
        for fname in uploads:
            base = Path(str(fname)).name
            if not base or base.startswith(".") or base != str(fname).replace("\\", "/").rsplit("/", 1)[-1]:
                raise ValueError(f"upload {fname!r}: not a plain file name")
            bases[fname] = base
        found = [x for fname, data in uploads.items() for x in scanner(self.ws.root).scan_bytes(data, bases[fname])]
        if found:
            raise SecretFound(found, action=f"refusing to curate {name}")
        folder = self.ws.root / "uploads" / name
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for fname, data in uploads.items():
            (folder / bases[fname]).write_bytes(data)
            paths.append(str(folder / bases[fname]))
        return self.curate(paths, name, test_frac, seed, **kw)

    def design_plan(self, preset: "str | TrainConfig", hardware: dict, model_config: dict, model_ref: str,
                    dataset: dict, overrides: dict | None = None, run_id: str | None = None, record: bool = True,
                    preset_name: str | None = None) -> dict:
        """Training config + hardware + model profile -> plan with a memory breakdown. ``preset``: the
        ``TrainConfig`` the submitting host validated (a run request: a preset file's content travels,
        not its path; ``preset_name`` says what it came from), or a built-in preset's name with
        ``overrides``. ``record``: commit it as configs/<run>.yaml now (else ``record_plan`` does, once
        the run is placed on this hardware)."""
        if isinstance(preset, TrainConfig):
            if overrides:
                raise ValueError("overrides go into the TrainConfig the request carries, not beside it")
            cfg = preset
        else:
            cfg, preset_name = load_config(preset, overrides), preset_name or preset
        hw = HardwareProfile.from_dict(hardware)
        model = ModelProfile.from_config(model_config)
        lengths = (dataset["manifest"].get("tokens") or {}).get("percentiles") or {}
        plan = make_plan(cfg, model, device=hw.device, bf16=hw.bf16, budget_bytes=hw.memory_budget_bytes,
                         token_p50=lengths.get("p50"), token_mean=lengths.get("mean"),
                         train_examples=dataset["manifest"]["counts"]["train"], host=hw.hostname,
                         facts=self.measurements(),
                         host_ram_bytes=hw.ram_available_bytes if hw.device == "cuda" else None,
                         gpu_count=(hw.gpu_count or None) if hw.device == "cuda" else None,
                         cpu_bf16_speedup=hw.cpu_bf16_speedup)
        d = plan.to_dict()
        d["run_id"] = run_id or self.new_run_id(cfg.name)
        d["model_ref"] = model_ref
        d["preset"] = preset_name
        d["dataset"] = {"name": dataset["name"], "content_hash": dataset["content_hash"]}
        d["hardware"] = {k: hardware[k] for k in ("hostname", "device", "gpu_name", "gpu_total_bytes",
                                                  "ram_total_bytes", "cpu_count")}
        return self.record_plan(d) if record else d

    @staticmethod
    def new_run_id(name: str) -> str:
        return f"{name}-{dt.datetime.now(dt.timezone.utc).strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"

    def record_plan(self, d: dict) -> dict:
        """Commit a plan as configs/<run>.yaml and log the decision (its preset, size and verdict)."""
        run_id, est, train = d["run_id"], d["estimate"], d["train"]
        total, fits = est["total_bytes"], est["fits"]
        path = self.ws.root / "configs" / f"{run_id}.yaml"
        header = (f"# duet train configs/{run_id}.yaml   (designed by the architect for "
                  f"{d['hardware']['hostname']}; estimate {total / 2**30:.2f} GiB, fits={fits})\n")
        body = {k: v for k, v in d.items() if k not in ("commit", "preset")}
        text = header + yaml.safe_dump(body, sort_keys=False)
        found = scanner(self.ws.root).scan_text(text, f"configs/{run_id}.yaml")
        if found:
            raise SecretFound(found, action=f"refusing to write the plan {run_id}")
        self.ws.init()
        path.write_text(text)
        sha = self.commit([path], f"config: {run_id} ({train['method']} {train['phase']}, "
                                     f"{total / 2**30:.2f} GiB est., fits={fits})")
        self.log("decision", {"text": f"plan {run_id}: {train['method']} {train['phase']} from preset {d.get('preset')}, "
                                      f"{total / 2**30:.2f} GiB estimated ({'fits' if fits else 'does not fit'})"
                                      f" on {d['hardware']['hostname']}",
                              "step": "plan", "run_id": run_id, "preset": d.get("preset"), "fits": fits,
                              "total_bytes": total, "breakdown_bytes": est["breakdown_bytes"],
                              "config": f"configs/{run_id}.yaml", "commit": sha})
        return {**d, "commit": sha}

    def measurements(self) -> list[dict]:
        """Measured peaks from earlier runs (cortex facts), for calibrating plans; [] if unreachable."""
        try:
            c = self.memory.cortex()
            return c.facts("measurement") if c is not None else []
        except Exception:
            return []

    def submission(self, plan: dict, dataset: dict) -> dict:
        """What the executor needs, self-contained (the dataset files travel with it)."""
        from training.run.executor import make_spec

        return make_spec(plan, dataset["path"])

    def record_run_events(self, run_id: str, events: list[dict]) -> int:
        """Log executor run events not seen before (by their per-run sequence number)."""
        last = self.seen_events.get(run_id, -1)
        new = [e for e in events if e["seq"] > last]
        for e in new:
            payload = {k: v for k, v in e.items() if k != "traceback"}
            self.log("run-event", payload)
            self.seen_events[run_id] = e["seq"]
        return len(new)

    def _write_record_files(self, out: Path, blobs: dict[str, bytes], action: str) -> None:
        """A run's record files into ``out`` (runs/<id>/), all of them scanned for secrets first."""
        sc = scanner(self.ws.root)
        rel = out.relative_to(self.ws.root).as_posix()
        found = [x for name, data in blobs.items() for x in sc.scan_bytes(data, f"{rel}/{name}")]
        if found:
            raise SecretFound(found, action=action)
        self.ws.init()
        out.mkdir(parents=True, exist_ok=True)
        for name, data in blobs.items():
            (out / name).write_bytes(data)

    def record_run(self, files: dict) -> dict:
        """Write runs/<id>/ (run.json, report.md, loss.png, events), commit, tag, mirror to the cortex."""
        rec = files["_record"]
        run_id = check_run_id(rec["run_id"])
        out = self.ws.root / "runs" / run_id
        blobs = {}
        for name, content in files.items():
            if name.startswith("_"):
                continue
            if name not in RECORD_FILES:
                raise ValueError(f"run {run_id}: unexpected record file {name!r} (allowed: {', '.join(RECORD_FILES)})")
            blobs[name] = base64.b64decode(content["b64"]) if isinstance(content, dict) else content.encode("utf-8")
        self._write_record_files(out, blobs, f"refusing to record run {run_id}")
        subject = (f"run: {run_id} {rec['status']} (dataset {rec['dataset']['content_hash'][:12]}, "
                   f"eval loss {_f(rec.get('eval_loss_before'))} -> {_f(rec.get('eval_loss_after'))})")
        sha = self.commit([out, self.session.path], subject,
                          tag=f"run/{run_id}" if rec["status"] == "finished" else None)
        self.memory.write({"op": "run", "record": rec})
        if rec["status"] == "finished" and rec.get("train_peak_bytes"):
            measured = rec["train_peak_bytes"]
            self.memory.add_fact(
                f"{rec['name']} ({rec['config']['train']['method']}, micro-batch "
                f"{rec['config']['train']['micro_batch']}, seq {rec['config']['train']['seq_len']}) on "
                f"{rec['host']['hostname']}: peak memory {measured / 2**20:.0f} MiB, "
                f"{rec.get('tokens_per_s')} tokens/s",
                {"run_id": run_id, "session_id": self.session_id, "commit": sha},
                kind="measurement", dedup_key=f"measurement:{run_id}",
                data={"peak_bytes": measured, "measured_as": rec.get("train_peak_measured_as"),
                      "estimate_bytes": rec["config"]["estimate"]["total_bytes"],
                      # the formula of what ran (effective micro-batch after an OOM re-plan), in the
                      # measurement's accounting (no CUDA context): what calibration divides by
                      "formula_bytes": rec.get("train_peak_formula_bytes") or rec["config"]["estimate"]["formula_bytes"],
                      "model_params": rec["config"]["model"]["params"],
                      "tokens_per_s": rec.get("tokens_per_s"), "host": rec["host"]["hostname"],
                      "device": rec["host"]["device"], "train": rec.get("train_effective") or rec["config"]["train"],
                      "phase_ratios": phase_ratios(rec)})
        self.log("state", {"step": "run recorded", "run_id": run_id, "status": rec["status"], "commit": sha})
        return {"run_id": run_id, "path": str(out), "commit": sha, "record": rec}

    def hypothesis_from_run(self, rec: dict) -> dict | None:
        """The demo's use of the neocortex: a hypothesis about the run, promoted when it held."""
        n = self.memory.neocortex()
        if n is None:
            return None
        hid = f"lora-helps-{rec['run_id']}"
        text = (f"LoRA r={rec['config']['train']['lora']['r']} SFT on dataset "
                f"{rec['dataset']['name']} lowers held-out loss")
        n.add_hypothesis(hid, text, 0.6, links={"run_id": rec["run_id"], "session_id": self.session_id})
        before, after = rec.get("eval_loss_before"), rec.get("eval_loss_after")
        evidence = {"run_id": rec["run_id"], "eval_loss_before": before, "eval_loss_after": after}
        if before is not None and after is not None and after < before:
            h = self.memory.promote(hid, evidence, {"run_id": rec["run_id"], "session_id": self.session_id})
        else:
            h = n.update_hypothesis(hid, evidence=evidence, status="rejected")
        self.log("note", {"step": "hypothesis", "id": hid, "status": h["status"], "text": text})
        return h

    def commit_session(self) -> str | None:
        self.memory.sync_session(self.session)
        n = len(self.session.events())
        return self.commit([self.session.path], f"session: {self.session_id} ({n} events)")

    def record_export(self, files: dict, entry: dict) -> dict:
        """An export of a recorded run: the updated run.json and report.md into runs/<id>/, a commit, a
        session event and a cortex fact (the file's path, size and sha256 on the GPU host)."""
        rec = files["_record"]
        run_id = check_run_id(rec["run_id"])
        out = self.ws.root / "runs" / run_id
        blobs = {n: files[n].encode("utf-8") for n in ("run.json", "report.md") if isinstance(files.get(n), str)}
        self._write_record_files(out, blobs, f"refusing to record the export of {run_id}")
        g = entry["files"].get("gguf") or {}
        what = f"{entry['name']}.gguf {entry.get('quant')} {g.get('bytes', 0) / 2**20:.1f} MiB" if g else entry["dir"]
        self.log("state", {"step": "exported", "run_id": run_id, "export": what, "dir": entry["dir"],
                           "sha256": g.get("sha256")})
        sha = self.commit([out, self.session.path], f"export: {run_id} -> {what}")
        v = entry["verification"]
        self.memory.add_fact(f"run {run_id} exported to {what} on {rec['host'].get('hostname')}, checked by "
                             f"{v.get('judge')} (top-1 {v.get('top1_agreement')}"
                             + (f", mean KL {v['kl_mean']}" if "kl_mean" in v else "") + ")",
                             {"run_id": run_id, "session_id": self.session_id, "commit": sha},
                             kind="export", dedup_key=f"export:{run_id}:{g.get('sha256') or entry['dir']}",
                             data={"path": g.get("path") or entry["dir"], "bytes": g.get("bytes"),
                                   "sha256": g.get("sha256"), "quant": entry.get("quant")})
        return {"path": str(out), "commit": sha}

    def record_sweep(self, comparison: dict) -> dict:
        """A finished sweep: sweeps/<id>/ (comparison table, JSON, chart), a commit tagged
        ``sweep/<id>`` naming the best run, and a decision in the session."""
        from roles import sweep

        files = sweep.write(self.ws.root, comparison)
        best = comparison["best"]
        what = f"best {best['run_id']} (eval loss {best['eval_loss_after']:.4f}, {best['point']})" if best else "no run finished"
        self.log("decision", {"text": f"sweep {comparison['sweep_id']}: {what}", "step": "sweep",
                              "sweep_id": comparison["sweep_id"], "best": best,
                              "runs": [r["run_id"] for r in comparison["rows"]]})
        sha = self.commit([*files.values(), self.session.path],
                          f"sweep: {comparison['sweep_id']} ({len(comparison['rows'])} runs, {what})",
                          tag=f"sweep/{comparison['sweep_id']}")
        return {"path": str(files["md"].parent), "commit": sha}

    def store_counts(self) -> dict:
        from memory_sync.backup import store_counts

        return {"outbox_pending": self.memory.pending(), **store_counts(self.memory)}

    def close(self) -> None:
        self.memory.close()


def _f(x) -> str:
    return "n/a" if x is None else f"{x:.3f}"



@contextlib.contextmanager
def _recording(workspace: str, postgres_url: str | None, mongo_url: str | None, title: str):
    """An Architect for one record written by a CLI with no architect actor: its session is committed
    when the block succeeds, and the stores are closed either way."""
    arch = Architect(workspace, postgres_url, mongo_url, session_title=title)
    try:
        yield arch
        arch.commit_session()
    finally:
        arch.close()


def record_export(workspace: str, postgres_url: str | None, mongo_url: str | None, files: dict, entry: dict) -> dict:
    """Record an export in the workspace (for a CLI with no architect actor running)."""
    with _recording(workspace, postgres_url, mongo_url, f"export {files['_record']['run_id']}") as arch:
        return arch.record_export(files, entry)


def record_judgement(workspace: str, postgres_url: str | None, mongo_url: str | None, answers: list[dict],
                     **verdict) -> dict:
    """Keep a person's judgement of answers as training data (roles/judgements.py), for a CLI."""
    from roles import judgements

    with _recording(workspace, postgres_url, mongo_url, f"judgement on {answers[0]['run_id']}") as arch:
        return judgements.judge(arch, answers, **verdict)


def record_judgement(workspace: str, postgres_url: str | None, mongo_url: str | None, answers: list[dict],
                     **verdict) -> dict:
    """Keep a person's judgement of answers as training data (roles/judgements.py), for a CLI."""
    from roles import judgements

    with _recording(workspace, postgres_url, mongo_url, f"judgement on {answers[0]['run_id']}") as arch:
        return judgements.judge(arch, answers, **verdict)


def record_sweep(workspace: str, postgres_url: str | None, mongo_url: str | None, comparison: dict) -> dict:
    """Record a sweep in the workspace (the CLI, after its runs)."""
    with _recording(workspace, postgres_url, mongo_url, f"sweep {comparison['sweep_id']}") as arch:
        return arch.record_sweep(comparison)
