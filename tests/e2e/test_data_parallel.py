"""One run over two workers through Ray Train, on the embedded cluster (gloo on this CPU), through the CLI:

- 2 workers x micro-batch 2 give the per-step losses of 1 worker x micro-batch 4 on the same data order
  (fp32, no dropout, within the first epoch);
- the script a user would write instead (TRL under torchrun, 2 processes, with duet's CPU loss head and
  LoRA update installed so the kernels match) gives the same losses;
- a SIGKILL of one worker's process mid-run: Ray Train starts the group again from the newest checkpoint,
  the run records it, and its losses equal the uninterrupted 2-worker run's;
- QLoRA (bitsandbytes' CPU path) over 2 workers trains and merges;
- DPO over 2 workers gives the per-step losses of 1 worker with twice the micro-batch;
- an OOM on a rank re-plans every worker (half the micro-batch, twice the accumulation), bad gradients roll
  back with half the learning rate; each resumes from the newest checkpoint.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e
REPO = Path(__file__).resolve().parents[2]
BASE = {"max_steps": 40, "checkpoint_every": 10, "eval_every": 20, "sample_prompts": 1, "max_new_tokens": 4,
        "warmup_steps": 2, "dtype": "fp32", "lora": {"r": 16, "alpha": 32, "dropout": 0.0}}


def duet(*args, cwd, env=None, timeout=600):
    r = subprocess.run([sys.executable, "-m", "cluster.cli", *map(str, args)], cwd=cwd, capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})})
    assert r.returncode == 0, (args, r.stdout[-2000:], r.stderr[-3000:])
    return r


def sums(path: Path, n: int = 240) -> Path:
    """Distinct short chats (a train split of ~216: 54 global batches of 4, so 40 steps stay in one epoch)."""
    rows = []
    for i in range(n):
        a, b = random.Random(i).randint(1, 999), random.Random(i + 7).randint(1, 999)
        rows.append({"id": f"sum-{i:03d}", "messages": [{"role": "user", "content": f"What is {a} plus {b}?"},
                                                         {"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
                     "metadata": {"category": "facts"}})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


class Cluster:
    def __init__(self, tmp: Path, env: dict | None = None):
        self.tmp, self.ws, self.env = tmp, tmp / "ws", env or {}
        self.data = sums(tmp / "sums.jsonl")
        duet("up", "--workspace", self.ws, cwd=tmp, env=self.env)

    def config(self, name: str, overrides: dict, data: Path | None = None) -> Path:
        p = self.tmp / f"{name}.yaml"
        data = data or self.data
        p.write_text(json.dumps({"preset": "demo", "model": "tiny", "data": [str(data)], "dataset": data.stem,
                                 "overrides": {**BASE, **overrides}}))
        return p

    def run(self, name: str, overrides: dict, detach: bool = False, data: Path | None = None) -> str:
        args = ["run", self.config(name, overrides, data), "--workspace", self.ws, "--json"] + (["--detach"] if detach else [])
        return json.loads(duet(*args, cwd=self.tmp, env=self.env).stdout)["run_id"]

    def dir(self, run_id: str) -> Path:
        return self.ws / ".duet" / "executor" / "runs" / run_id

    def record(self, run_id: str) -> dict:
        return json.loads((self.dir(run_id) / "run.json").read_text())

    def down(self):
        duet("down", "--workspace", self.ws, cwd=self.tmp, env=self.env)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("dp"))
    yield c
    c.down()


def losses(rec: dict) -> dict[int, float]:
    return {x["step"]: x["loss"] for x in rec["losses"]}


@pytest.fixture(scope="module")
def two_workers(cluster):
    run_id = cluster.run("dp2", {"workers": 2, "micro_batch": 2})
    return run_id, cluster.record(run_id)


def test_two_workers_give_the_losses_of_one_with_twice_the_micro_batch(cluster, two_workers):
    run_id, two = two_workers
    assert two["status"] == "finished", two["error"]
    assert two["world_size"] == 2 and two["config"]["workers"] == 2 and two["config"]["global_batch"] == 4
    assert sorted(w["rank"] for w in two["workers"]) == [0, 1]
    assert all(w["device"] == "cpu" and w["node"] and w["pid"] for w in two["workers"])
    # where the Trainer put each rank, checked against the rank's device, and its collectives (all on it)
    assert all(w["trainer_device"] == "cpu" and w["model_device"] == "cpu" and w["collectives"] > 40
               for w in two["workers"]), two["workers"]
    assert any("data parallel over 2 workers" in d for d in two["config"]["decisions"])
    # the executor's exporter has each worker's telemetry, labelled by rank
    import urllib.request

    port = json.loads(duet("status", "--workspace", cluster.ws, "--json", cwd=cluster.tmp).stdout)["cluster"]["exporter"]["port"]
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    for rank in ("0", "1"):
        for name in ("duet_worker_tokens_per_second", "duet_worker_step_seconds", "duet_worker_memory_bytes"):
            assert any(line.startswith(name + "{") and f'rank="{rank}"' in line and run_id in line
                       for line in text.splitlines()), (name, rank)
    one = cluster.record(cluster.run("dp1", {"workers": 1, "micro_batch": 4}))
    assert one["status"] == "finished" and one.get("world_size") is None
    a, b = losses(two), losses(one)
    assert sorted(a) == sorted(b) == list(range(1, 41))
    worst = max(abs(a[s] - b[s]) for s in a)
    assert worst < 1e-4, worst
    assert (cluster.ws / "runs" / run_id / "run.json").is_file()  # recorded like any run
    ckpt = cluster.dir(run_id) / "raytrain" / "group"
    assert any(p.name.startswith("checkpoint_") for p in ckpt.iterdir())  # rank 0 reported them to Ray Train


def test_two_workers_train_what_plain_trl_under_torchrun_trains(cluster, two_workers):
    """The script a user would write instead (TRL's SFTTrainer + PEFT, with duet's CPU kernels installed,
    ``--duet-cpu``, so the arithmetic is the same) under `torchrun --nproc_per_node 2`, with the run's plan
    (model, data split, LoRA, fp32, hyper-parameters): the same per-step losses as duet's 2 workers, so
    duet's data parallel is TRL's DDP."""
    from benchmarks.data_parallel import plain_arm

    run_id, two = two_workers
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    plain = plain_arm(two, cluster.dir(run_id), cluster.tmp / "plain-ddp", 2, 2, 40, env)
    assert plain["world_size"] == 2 and sorted(plain["losses"]) == list(range(1, 41))
    mine = losses(two)
    worst = max(abs(mine[s] - v) for s, v in plain["losses"].items())
    assert worst < 1e-4, worst


def test_a_killed_worker_restarts_the_group_and_the_losses_match(cluster, two_workers):
    _, uninterrupted = two_workers
    run_id = cluster.run("dp2-kill", {"workers": 2, "micro_batch": 2}, detach=True)
    d = cluster.dir(run_id)
    deadline = time.time() + 300
    while not ((d / "losses.jsonl").exists() and len((d / "losses.jsonl").read_text().splitlines()) >= 15):
        assert time.time() < deadline, "no step 15"
        time.sleep(0.1)
    victim = json.loads((d / "workers" / "rank-1.json").read_text())["pid"]
    os.kill(victim, signal.SIGKILL)
    while cluster.record(run_id)["status"] not in ("finished", "failed", "cancelled"):
        assert time.time() < deadline + 300, "the run did not end"
        time.sleep(1)
    rec = cluster.record(run_id)
    assert rec["status"] == "finished", rec["error"]
    (r,) = [x for x in rec["recoveries"] if x["kind"] == "worker_restart"]
    assert r["attempt"] == 2 and "checkpoint-" in r["resumed_from"]
    assert victim not in [w["pid"] for w in rec["workers"]]  # the group that finished is a new one
    a, b = losses(uninterrupted), losses(rec)
    assert sorted(b) == list(range(1, 41)) and max(abs(a[s] - b[s]) for s in a) < 1e-4


def test_qlora_over_two_cpu_workers_trains_and_merges(cluster):
    rec = cluster.record(cluster.run("dp2-qlora", {"workers": 2, "micro_batch": 2, "method": "qlora",
                                                   "max_steps": 12, "dtype": "auto"}))
    assert rec["status"] == "finished", rec["error"]
    assert rec["world_size"] == 2 and rec["train_effective"]["method"] == "qlora" and rec["steps"] == 12
    assert rec["trainable_dtypes"] == ["float32"]  # as planned, not TRL's bf16 cast of a 4-bit model's adapters
    assert rec["merged_model"]["path"] and Path(rec["merged_model"]["path"], "config.json").is_file()


def test_dpo_over_two_workers_gives_the_losses_of_one(cluster):
    """The DPO phase over 2 workers x micro-batch 2 and 1 worker x micro-batch 4: the same per-step losses."""
    pairs = []
    for i in range(96):
        a, b = random.Random(i).randint(1, 999), random.Random(i + 7).randint(1, 999)
        pairs.append({"id": f"pair-{i:03d}", "prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                      "chosen": [{"role": "assistant", "content": f"{a} plus {b} is {a + b}."}],
                      "rejected": [{"role": "assistant", "content": f"{a} plus {b} is {a + b + 1}."}],
                      "metadata": {"category": "facts"}})
    data = cluster.tmp / "pairs.jsonl"
    data.write_text("".join(json.dumps(p) + "\n" for p in pairs))
    dpo = {"phase": "dpo", "max_steps": 12, "checkpoint_every": 6, "eval_every": 12}
    two = cluster.record(cluster.run("dpo2", {**dpo, "workers": 2, "micro_batch": 2}, data=data))
    one = cluster.record(cluster.run("dpo1", {**dpo, "workers": 1, "micro_batch": 4}, data=data))
    assert two["status"] == one["status"] == "finished", (two["error"], one["error"])
    assert two["world_size"] == 2 and two["phase"] == one["phase"] == "dpo"
    a, b = losses(two), losses(one)
    assert sorted(a) == sorted(b) == list(range(1, 13)) and max(abs(a[s] - b[s]) for s in a) < 1e-4


def test_an_oom_then_bad_gradients_on_a_rank_apply_duet_policies(tmp_path):
    """Rank 0's step 7 raises a real OutOfMemoryError (every worker is re-planned), and its step 12 has
    NaN activations (the NaN reaches every rank through the all-reduce: a rollback with half the LR)."""
    c = Cluster(tmp_path, env={"DUET_FAULT": "oom@step=7,nan@step=12"})
    try:
        rec = c.record(c.run("dp2-faults", {"workers": 2, "micro_batch": 2, "max_steps": 14, "checkpoint_every": 5}))
    finally:
        c.down()
    assert rec["status"] == "finished", rec["error"]
    oom, rollback = rec["recoveries"]
    assert oom["kind"] == "oom" and oom["rank"] == 0 and oom["change"] == {"micro_batch": 1, "grad_accum": 2}
    assert oom["resumed_from"].endswith("checkpoint-5")
    assert rollback["kind"] == "rollback" and rollback["lr_scale"] == 0.5 and rollback["resumed_from"].endswith("checkpoint-10")
    eff = rec["train_effective"]
    assert (eff["micro_batch"], eff["grad_accum"], eff["workers"]) == (1, 2, 2)  # the same global batch
    assert sorted(losses(rec)) == list(range(1, 15)) and all(v == v for v in losses(rec).values())
