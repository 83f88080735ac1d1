"""A data-parallel rank's device rules, on this CPU (issue 36): NCCL takes CUDA tensors only, so
every tensor a rank hands a collective must be made on the rank's device, the rank's GPU is the one
Ray Train assigned (made current before any CUDA call), and the Trainer must put the rank there.

A tensor made without a device lands on torch's default device. Here the default is made "meta" for
the block under test, so a tensor the rank code forgot to place is caught on a machine whose only
real device is the CPU."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from tests.fakes import FakeNcclRules
from training.run import rank as rank_mod
from training.run.rank import DeviceMismatch, Group, RankControl, check_trainer_device, rank_device


@pytest.fixture
def nccl(monkeypatch):
    fake = FakeNcclRules("cpu")
    monkeypatch.setattr(rank_mod, "dist", fake)
    return fake


def test_a_tensor_made_without_the_ranks_device_is_refused(nccl):
    with torch.device("meta"):  # what a GPU rank's default (CPU) is to NCCL: not the group's device
        loose = torch.tensor([1, 0])
        with pytest.raises(RuntimeError, match="device type meta"):
            nccl.broadcast(loose, 0)
        with pytest.raises(DeviceMismatch, match="on meta; this rank's collectives run on cpu"):
            Group("cpu").check(loose)


def test_agree_and_barrier_run_on_the_ranks_device(nccl):
    g = Group("cpu")
    with torch.device("meta"):
        assert g.agree([1, 0, 3]) == [1, 0, 3]
        g.barrier()
    assert nccl.calls == [("broadcast", "cpu", 0), ("barrier", None)] and g.calls == 2


def test_a_gpu_ranks_barrier_names_its_gpu(monkeypatch):
    fake = FakeNcclRules("cpu")
    monkeypatch.setattr(rank_mod, "dist", fake)
    g = Group("cpu")
    g.device = torch.device("cuda", 3)  # no GPU here: only the barrier's arguments are checked
    g.barrier()
    assert fake.calls == [("barrier", [3])]


def test_the_ranks_callbacks_use_only_the_ranks_device(tmp_path, nccl):
    """RankControl after a step (the cancel/pause broadcast) and through a pause, as a GPU rank runs
    them, with every tensor not explicitly placed landing elsewhere."""
    ctl = {"pause": True}
    state = []
    run = SimpleNamespace(dir=tmp_path, progress={"step": 1}, state="training", watchdog=None,
                          cancel_requested=lambda: False, pause_requested=lambda: False,
                          set_state=state.append, cancel=lambda: state.append("cancel"))
    (tmp_path / "control.json").write_text(json.dumps(ctl))
    rc = RankControl(run, True, {"rank": 0, "pid": 1, "device": "cpu"}, Group("cpu"))
    control = SimpleNamespace(should_training_stop=False, should_save=False)
    with torch.device("meta"):
        rc.on_step_end(None, SimpleNamespace(global_step=1), control)
        assert control.should_save and rc.pausing
        (tmp_path / "control.json").write_text(json.dumps({"pause": False}))
        rc.on_save(None, SimpleNamespace(global_step=1), control)
    assert [c[0] for c in nccl.calls] == ["broadcast", "barrier", "broadcast"]
    assert all(c[1] == "cpu" for c in nccl.calls if c[0] == "broadcast")
    assert [str(s) for s in state] == ["paused", "training"]
    me = json.loads((tmp_path / "workers" / "rank-0.json").read_text())
    assert me["device"] == "cpu" and me["step"] == 1 and me["collectives"] == 0


def test_the_ranks_device_is_ray_trains_and_is_made_current_first(monkeypatch):
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", made_current.append)
    assert rank_device("cpu") == torch.device("cpu") and made_current == []
    assert rank_device("cuda:2") == torch.device("cuda", 2)
    assert made_current == [torch.device("cuda", 2)]
    with pytest.raises(DeviceMismatch, match="names no GPU"):
        rank_device("cuda")


def test_the_trainer_must_put_the_rank_on_its_device():
    model = torch.nn.Linear(2, 2)
    ok = SimpleNamespace(args=SimpleNamespace(device=torch.device("cpu")), model=model)
    assert check_trainer_device(ok, "cpu") == {"trainer_device": "cpu", "model_device": "cpu"}
    elsewhere = SimpleNamespace(args=SimpleNamespace(device=torch.device("meta")), model=model)
    with pytest.raises(DeviceMismatch, match="the Trainer chose meta"):
        check_trainer_device(elsewhere, "cpu")


def test_qlora_loads_on_the_ranks_gpu(monkeypatch, tmp_path):
    """bitsandbytes places a 4-bit model at load (the Trainer never moves it): on the rank's GPU, not 0."""
    import transformers

    from training.config import load_config
    from training.run.model_load import load_train_model

    seen = {}

    class Stop(Exception):
        pass

    def from_pretrained(path, **kw):
        seen.update(kw)
        raise Stop

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    cfg = load_config("demo", {"method": "qlora"})
    with pytest.raises(Stop):
        load_train_model(tmp_path, cfg, device="cuda", dtype="bf16", device_index=3)
    assert seen["device_map"] == {"": 3}


def test_the_ranks_see_the_gpus_ray_gives_them_not_the_executors(monkeypatch):
    from training.run.distributed import worker_env

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    monkeypatch.setenv("ACCELERATE_TORCH_DEVICE", "cuda:0")
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    env = worker_env(1)
    assert "CUDA_VISIBLE_DEVICES" not in env and "ACCELERATE_TORCH_DEVICE" not in env
    assert env["NCCL_DEBUG"] == "WARN"
