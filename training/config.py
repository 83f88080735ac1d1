"""Training configs, typed from the YAML to the trainer: ``TrainConfig`` (one run's hyper-parameters,
every default once, here), ``RunConfig`` (what ``duet run CONFIG`` accepts), the plan file
(``configs/<run>.yaml``) and the strict YAML reader whose errors name file:line and field.

No torch here: the architect reads configs on a laptop.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from training.track.settings import Tracking, check_report_to
from training.yaml_reader import PlanError, format_validation, key_lines, read_yaml_file


PRESETS_DIR = Path(__file__).parent / "presets"


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_run_id(run_id: object) -> str:
    """A run id names a folder under the executor's runs/: PlanError unless it is a plain name."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise PlanError(f"run id {run_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
                        "digit (it names a folder; no '/' or '..')")
    return run_id


_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # "4" is not 4, NaN is not a number


# A plan "fits" when its total stays under 85 % of the budget: below the watchdog's 90 % VRAM alert
# (Thresholds.vram_fraction, infra/prometheus/rules.yml), so a run that keeps to its plan never alarms.
USABLE_FRACTION = 0.85


@dataclass
class Thresholds:
    """The watchdog's thresholds (training/run/watchdog.py), one home: the run's ``watchdog:`` section sets
    them, TrainConfig's gradient-norm fields default to them, and tests/unit/test_structure.py checks
    that infra/prometheus/rules.yml alerts at the same values."""

    vram_fraction: float = 0.90  # above the planner's USABLE_FRACTION (0.85): a plan that fits never alarms
    temperature_c: float = 85.0
    slowdown_margin_c: float = 5.0
    resume_below_c: float = 75.0
    thermal_pause: bool = True
    throughput_drop: float = 0.80
    throughput_warmup: int = 3
    throughput_baseline: int = 5
    throughput_patience: int = 2
    grad_norm_high: float = 10.0
    grad_norm_low: float = 0.01
    grad_norm_patience: int = 3
    stall_seconds: float = 300.0
    interval_s: float = 1.0
    webhook_url: str | None = None

    def __post_init__(self) -> None:
        """Every threshold is a finite number of its type, in a sensible range (ValueError naming it)."""
        ranges = {"vram_fraction": (0, 1), "temperature_c": (0, 150), "slowdown_margin_c": (0, 100),
                  "resume_below_c": (0, 150), "throughput_drop": (0, 1), "throughput_warmup": (0, 100_000),
                  "throughput_baseline": (1, 100_000), "throughput_patience": (1, 100_000),
                  "grad_norm_high": (0, 1e12), "grad_norm_low": (0, 1e12), "grad_norm_patience": (1, 100_000),
                  "stall_seconds": (1, 86_400 * 7), "interval_s": (0.01, 3600)}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name in ranges:
                lo, hi = ranges[f.name]
                want_int = f.type in ("int", int)
                ok_type = isinstance(v, int) if want_int else isinstance(v, (int, float))
                if isinstance(v, bool) or not ok_type or not math.isfinite(v) or not lo <= v <= hi:
                    raise ValueError(f"watchdog.{f.name}: {v!r} is not a {'whole ' if want_int else ''}number in "
                                     f"[{lo}, {hi}]")
        if not isinstance(self.thermal_pause, bool):
            raise ValueError(f"watchdog.thermal_pause: {self.thermal_pause!r} is not true or false")
        if self.webhook_url is not None and (not isinstance(self.webhook_url, str)
                                             or not self.webhook_url.startswith(("http://", "https://"))):
            raise ValueError(f"watchdog.webhook_url: {self.webhook_url!r} is not an http(s) URL")
        if self.resume_below_c >= self.temperature_c:
            raise ValueError(f"watchdog.resume_below_c ({self.resume_below_c}) must be below temperature_c "
                             f"({self.temperature_c})")

    @classmethod
    def from_train(cls, train: dict) -> "Thresholds":
        """The run's train config: ``watchdog: {...}`` plus the engine's grad-norm settings."""
        if not isinstance(train.get("watchdog") or {}, dict):
            raise ValueError("watchdog: expected a mapping of thresholds, e.g. {temperature_c: 80}")
        raw = dict(train.get("watchdog") or {})
        if "grad_norm_limit" in train:
            raw.setdefault("grad_norm_high", train["grad_norm_limit"])
        if "grad_norm_min" in train:
            raw.setdefault("grad_norm_low", train["grad_norm_min"])
        if "grad_norm_patience" in train:
            raw.setdefault("grad_norm_patience", train["grad_norm_patience"])
        known = {f.name for f in fields(cls)}
        unknown = {str(k) for k in raw} - known
        if unknown:
            raise ValueError(f"watchdog: unknown field(s) {sorted(unknown)} (allowed: {', '.join(sorted(known))})")
        raw.setdefault("webhook_url", os.environ.get("DUET_ALERT_WEBHOOK") or None)
        return cls(**raw)


class CpuPaths(BaseModel):
    """How a run trains on a CPU executor: duet's faster paths (on by default, measured in
    benchmarks/), each of which changes the numbers a run computes, so each is a field of the config
    and of run.json, never an environment switch."""

    model_config = _STRICT
    fast_loss: bool = Field(True, description="duet's chunked CPU loss head (training/run/fast_loss.py); false: TRL's.")
    lora_fp32: bool = Field(True, description="bf16 LoRA on CPU: the low-rank update added in fp32 "
                                              "(training/run/cpu_lora.py); false: all in bf16.")
    fast_dropout: bool = Field(True, description="LoRA (fp32, or bf16 with lora_fp32): dropout masks drawn 16 bits "
                                                 "an element, one for the adapters that read the same input (q, k, "
                                                 "v; gate, up); false: torch's own draw, one an adapter.")
    padding_free: bool = Field(True, description="SFT without packing: each micro-batch's examples in one row, "
                                                 "attention computed example by example, no compute on padding "
                                                 "(training/run/padding_free.py); false: padded rows.")
    allow_emulated_dtype: bool = Field(False, description="train in an explicit dtype bf16 or fp16 on a CPU that "
                                                          "emulates it (no AVX512-BF16/AMX): refused otherwise, as "
                                                          "it trains many times slower than fp32.")


class LoraSettings(BaseModel):
    model_config = _STRICT
    r: int = Field(8, ge=1, le=1024, description="LoRA rank.")
    alpha: int = Field(16, ge=1, le=1_000_000, description="LoRA alpha (scaling = alpha / r).")
    dropout: float = Field(0.05, ge=0.0, lt=1.0, description="Dropout on the LoRA input.")
    target_modules: list[str] | Literal["all-linear"] = Field(
        "all-linear", description="Module names to adapt, or 'all-linear'.")

    @field_validator("target_modules")
    @classmethod
    def _modules(cls, v):
        if isinstance(v, list) and (not v or not all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.]{0,127}", m) for m in v)):
            raise ValueError("give module names such as [q_proj, v_proj], or 'all-linear'")
        return v


class TrainConfig(BaseModel):
    """One training run's hyper-parameters. Every field is validated; unknown fields are errors,
    numbers must have their type (no "4" for 4) and be finite."""

    model_config = _STRICT
    name: str = Field(..., pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="Run name prefix.")
    phase: Literal["sft", "dpo"] = Field("sft", description="Training objective.")
    method: Literal["lora", "qlora", "full"] = Field("lora", description="What is trained and how the base is stored.")
    lora: LoraSettings = Field(default_factory=LoraSettings)
    cpu: CpuPaths = Field(default_factory=CpuPaths, description="CPU executors only: duet's fast paths.")
    learning_rate: float = Field(2e-4, gt=0, lt=1, description="Peak learning rate.")
    lr_scheduler: Literal["cosine", "linear", "constant", "constant_with_warmup"] = "cosine"
    warmup_steps: int = Field(100, ge=0, le=10_000_000, description="Linear warm-up steps.")
    micro_batch: int = Field(4, ge=1, le=4096, description="Sequences per forward pass.")
    grad_accum: int = Field(4, ge=1, le=4096, description="Micro-batches per optimizer step.")
    max_steps: int = Field(1000, ge=1, le=10_000_000, description="Optimizer steps.")
    seq_len: int = Field(1024, ge=16, le=262144, description="Maximum tokens per sequence.")
    checkpoint_every: int = Field(100, ge=1, le=10_000_000, description="Save a checkpoint every N steps.")
    keep_checkpoints: int = Field(3, ge=1, le=1000, description="Keep the newest K checkpoints.")
    eval_every: int = Field(100, ge=1, le=10_000_000, description="Evaluate on the test split every N steps.")
    test_frac: float = Field(0.1, gt=0, lt=1, description="Held-out fraction when curating.")
    seed: int = Field(42, ge=0, le=2**32 - 1, description="Seed for data order, dropout and init.")
    gradient_checkpointing: bool | Literal["auto"] = Field(
        "auto", description="Recompute activations in backward; auto: only when the plan does not fit without.")
    packing: bool | Literal["auto"] = Field(
        "auto", description="Pack short examples into full sequences (SFT); auto: when the median example fills "
                            "at most half of seq_len (padding would waste more than it costs).")
    dtype: Literal["auto", "bf16", "fp16", "fp32"] = Field("auto", description="auto: bf16 when the GPU has it, fp32 on CPU.")
    dry_run_steps: int = Field(0, ge=0, le=100_000, description="Steps of a dry run before the real one (0: none).")
    workers: Annotated[int, Field(ge=1, le=64)] | Literal["auto"] = Field(
        "auto", description="Data-parallel workers (processes, one a GPU) training this run through Ray "
                                         "Train; auto: the executor host's GPUs, 1 on CPU.")
    init_from: str | None = Field(None, description="Run id whose adapter this run starts from (phase chaining).")
    eval_batch: int | None = Field(None, ge=1, le=4096, description="Sequences per eval forward (default: micro_batch).")
    dpo_beta: float = Field(0.1, gt=0, le=100, description="DPO temperature (phase dpo).")
    grad_norm_limit: float = Field(Thresholds.grad_norm_high, gt=0,
                                   description="Gradient norm above which steps count as exploding.")
    grad_norm_patience: int = Field(Thresholds.grad_norm_patience, ge=1, le=10_000,
                                    description="Consecutive exploding steps before a rollback.")
    grad_norm_min: float = Field(Thresholds.grad_norm_low, ge=0,
                                 description="Gradient norm below which an alert (only) is raised.")
    rollback_lr_factor: float = Field(0.5, gt=0, lt=1, description="LR scale after a rollback on bad gradients.")
    max_recoveries: int = Field(6, ge=0, le=1000, description="OOM re-plans + rollbacks before the run gives up.")
    sample_prompts: int = Field(3, ge=0, le=20, description="Test prompts to generate samples for.")
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Tokens per sample generation.")
    watchdog: dict = Field(default_factory=dict, description="Watchdog thresholds (training/run/watchdog.py Thresholds), "
                                                             "e.g. {temperature_c: 80, stall_seconds: 600}.")
    report_to: list[str] = Field(default_factory=list, description="Experiment trackers the run reports to: mlflow, "
                                                                   "trackio, tensorboard, wandb (none by default).")
    tracking: Tracking = Field(default_factory=Tracking, description="Each tracker's settings (training/track/settings.py).")

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to(cls, v):
        return check_report_to(v)

    @field_validator("init_from")
    @classmethod
    def _init_from(cls, v):
        return None if v is None else check_run_id(v)

    @field_validator("watchdog")
    @classmethod
    def _watchdog(cls, v: dict) -> dict:
        Thresholds.from_train({"watchdog": v})  # unknown names -> a clear error
        return v

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self

    @property
    def effective_batch(self) -> int:
        """Sequences a worker contributes to an optimizer step (micro-batch x accumulation)."""
        return self.micro_batch * self.grad_accum

    @property
    def world_size(self) -> int:
        """Workers once the planner resolved ``auto`` (1 until then)."""
        return self.workers if isinstance(self.workers, int) else 1

    @property
    def global_batch(self) -> int:
        """Sequences an optimizer step sees over every worker."""
        return self.effective_batch * self.world_size


def train_config(train: object, source: str, text: str = "", overrides: dict | None = None,
                 override_source: str = "overrides", prefix: str = "") -> TrainConfig:
    """The one validation of a training config, whoever gives it: a preset, a plan file's
    ``train:``, a run config's ``overrides:`` or CLI flags. PlanError naming source:line and field."""
    if not isinstance(train, dict):
        raise PlanError(f"{source}: the training fields must be a mapping (got {type(train).__name__})")
    train = {k: v for k, v in train.items() if k not in ("estimate", "hardware", "model", "dataset", "verdict")}
    if overrides is not None and not isinstance(overrides, dict):
        raise PlanError(f"{source}: overrides must be a mapping of training fields")
    train.update(overrides or {})
    try:
        return TrainConfig(**{str(k): v for k, v in train.items()})
    except ValidationError as exc:
        raise PlanError(format_validation(exc, source, key_lines(text), overrides, override_source, prefix)) from exc
    except ValueError as exc:  # a field validator's own message (watchdog thresholds)
        raise PlanError(f"{source}: {exc}") from exc


def load_config(path: str | os.PathLike, overrides: dict | None = None,
                override_source: str = "overrides") -> TrainConfig:
    """Load a preset/config YAML (a ``train:`` section or the bare fields) with clear errors."""
    p = Path(path)
    if not p.is_file():
        cand = PRESETS_DIR / f"{path}.yaml"
        if re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", str(path)) and cand.is_file():
            p = cand
        else:
            names = ", ".join(sorted(x.stem for x in PRESETS_DIR.glob("*.yaml")))
            raise PlanError(f"{path}: no such config file or preset (presets: {names})")
    data, text = read_yaml_file(p)
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise PlanError(f"{p}:1: expected a mapping of fields")
    return train_config(data.get("train", data), str(p), text, overrides, override_source,
                        "train." if "train" in data else "")


class PlanFile(BaseModel):
    """What `duet train PLAN` accepts: a plan the architect wrote (configs/<run>.yaml)."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)
    run_id: str
    model_ref: str = Field(..., min_length=1, max_length=4096)
    dataset: dict
    train: dict
    estimate: dict
    device: Literal["cpu", "cuda", "mps"] = "cpu"
    dtype: Literal["bf16", "fp16", "fp32"] = "fp32"
    model: dict = Field(default_factory=dict)
    trainable_params: int | None = None
    effective_batch: int | None = None
    workers: int | None = None
    global_batch: int | None = None
    steps_per_epoch: int | None = None
    decisions: list = Field(default_factory=list)
    suggestions: list = Field(default_factory=list)
    hardware: dict = Field(default_factory=dict)
    commit: str | None = None


def load_plan_file(path: str | os.PathLike) -> dict:
    """A plan file, validated as a whole: its ``train:`` by TrainConfig (the same model `duet plan`
    uses), its run id and dataset reference as names of folders. PlanError naming file:line and field."""
    data, text = read_yaml_file(path)
    src = str(path)
    if not isinstance(data, dict):
        raise PlanError(f"{src}:1: expected a plan (a mapping with run_id, train, model_ref, dataset, estimate)")
    missing = [k for k in ("run_id", "train", "model_ref", "dataset", "estimate") if k not in data]
    if missing:
        raise PlanError(f"{src}: field {missing[0]!r} missing: `duet train` takes a plan the architect wrote "
                        "(configs/<run>.yaml); `duet run` takes a run config")
    try:
        doc = PlanFile(**{str(k): v for k, v in data.items()})
    except ValidationError as exc:
        raise PlanError(format_validation(exc, src, key_lines(text))) from exc
    check_run_id(doc.run_id)
    ds = doc.dataset
    from training.data.schema import DatasetError
    from training.data.dataset import version_dir

    try:
        version_dir("datasets", ds.get("name"), ds.get("content_hash"))
    except DatasetError as exc:
        raise PlanError(f"{src}:{key_lines(text).get('dataset', 1)}: field 'dataset': {exc}") from exc
    cfg = train_config(doc.train, src, text, prefix="train.")
    out = doc.model_dump()
    out["train"] = cfg.model_dump()
    # dtype is set in one place: the plan's own (what the planner chose) or train.dtype (a person's
    # edit); both, disagreeing, is refused rather than one silently winning.
    lines = key_lines(text)
    if cfg.dtype != "auto":
        if "dtype" in doc.model_fields_set and doc.dtype != cfg.dtype:
            raise PlanError(f"{src}:{lines.get('train.dtype', lines.get('dtype', 1))}: field 'train.dtype': "
                            f"{cfg.dtype!r} disagrees with the plan's dtype {doc.dtype!r} (line {lines.get('dtype', '?')}); "
                            "set one of them")
        out["dtype"] = cfg.dtype
    return out


class RunConfig(BaseModel):
    """What `duet run CONFIG` accepts (see examples/persona/run.yaml)."""

    model_config = _STRICT
    preset: str = Field("demo", min_length=1, description="A preset name or a YAML file (relative to this file).")
    model: str = Field("smollm2", min_length=1, description="smollm2, gemma3-270m, tiny, or a local Hugging Face folder.")
    data: str | list[str] = Field(..., description="Chat or DPO JSONL files, relative to this file.")
    dataset: str = Field("data", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$", description="The dataset's name.")
    overrides: dict = Field(default_factory=dict, description="Training fields that replace the preset's.")
    test_frac: float = Field(0.1, gt=0, lt=1, description="Held-out fraction.")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="Split seed.")


def load_run_config(path: str | os.PathLike) -> tuple[RunConfig, list[Path], TrainConfig]:
    """A run config (its ``preset`` resolved: a preset name, or a file's path), its data files
    (checked to stay inside the config's folder unless absolute) and the training config its preset
    + overrides give. PlanError naming file:line and field."""
    data, text = read_yaml_file(path)
    src = str(path)
    if not isinstance(data, dict):
        raise PlanError(f"{src}:1: expected a run config (a mapping with preset, model, data, ...)")
    try:
        rc = RunConfig(**{str(k): v for k, v in data.items()})
    except ValidationError as exc:
        raise PlanError(format_validation(exc, src, key_lines(text))) from exc
    base = Path(path).resolve().parent
    files = []
    for d in [rc.data] if isinstance(rc.data, str) else rc.data:
        if not d.strip():
            raise PlanError(f"{src}:{key_lines(text).get('data', 1)}: field 'data': an empty path")
        p = Path(d).expanduser()
        if not p.is_absolute():
            p = base / p
            real = p.resolve()
            if base not in real.parents:
                raise PlanError(f"{src}:{key_lines(text).get('data', 1)}: field 'data': {d!r} leads out of "
                                f"{base}; give an absolute path for data that lives elsewhere")
        files.append(p)
    if not files:
        raise PlanError(f"{src}: field 'data': give at least one file")
    preset = rc.preset
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", preset) or (base / preset).is_file():
        preset = str((base / preset) if not Path(preset).is_absolute() else Path(preset))
    cfg = load_config(preset, rc.overrides, f"{src}:{key_lines(text).get('overrides', 1)}: overrides")
    return rc.model_copy(update={"preset": preset}), files, cfg

