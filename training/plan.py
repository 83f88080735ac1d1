"""Training plans: a preset + the executor's hardware + the model's config -> a validated plan with
a memory estimate broken down by component, and a verdict.

No torch here: the architect plans on a laptop. Formulas (bytes):

- weights: params x bytes/param (fp32 4, bf16/fp16 2, nf4 with double quantization 4.127 bits
  = 0.516 bytes); with QLoRA the embeddings and lm_head are kept in fp32 (peft's
  prepare_model_for_kbit_training upcasts every non-quantized parameter);
- LoRA: r x (in + out) per adapted matrix; trainable params x (weight + grad in the train dtype
  + AdamW's two fp32 moments, + an fp32 master copy when training in 16-bit) = 16 bytes: PEFT keeps
  adapters in fp32; a full fine-tune keeps fp32 weights under autocast: 4 + 4 + 8 bytes a parameter;
- activations per layer and token, in elements of the train dtype (fp32 on CPU, bf16 included: the
  residual stream stays fp32 beside LoRA's fp32 update), 22 h + 5 i without gradient
  checkpointing (fp32 RMSNorm inputs, q/k/v, their rotary, head-major and GQA-expanded copies, the
  attention output and what SDPA keeps for its backward, MLP gate/up/act/down inputs; fitted to
  duet's training path with benchmarks/vram_planner.py), plus 6 h + i for LoRA dropout's copies of
  each adapted input when dropout > 0 and not DPO (TRL's DPO disables dropout; QLoRA: x 0.8, measured); with checkpointing, the layer's
  input (h) per layer on CUDA, 13 h on CPU in fp32 and 17 h under bf16 autocast (measured there: more
  than the input is kept), plus one layer's full set.
  No attention scores: SDPA's flash kernels (CUDA, and CPU in torch 2.13) never hold heads x seq^2
  (measured: the same tokens at seq 512 and 1024 take the same memory), except a packed row on CPU:
  its block-diagonal mask sends SDPA down torch's math path, which keeps every layer's heads x seq^2
  scores (``attention_scores``, PACKED_SCORE_BYTES_CPU a score);
- loss head: TRL 1.16 computes the SFT and DPO losses through a fused LM head that never holds the
  logits, only [4096 tokens x 32768 vocabulary] tiles (``loss_head_bytes``);
- overhead: allocator slack (8 % + 256 MiB) on a GPU, the CUDA context (~500 MiB) reported
  apart because torch.cuda.max_memory_reserved() does not see it; the runtime (640 MiB: torch,
  tokenizers, datasets) on CPU.

``gradient_checkpointing: auto`` (the default) turns it on only when the plan does not fit
without it: checkpointing costs ~30 % throughput.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

PRESETS_DIR = Path(__file__).parent / "presets"
GIB = 1024 ** 3
MIB = 1024 ** 2


class PlanError(ValueError):
    """A preset or config that does not validate; the message names file, field and what is allowed."""


RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")


def check_run_id(run_id: object) -> str:
    """A run id names a folder under the executor's runs/: PlanError unless it is a plain name."""
    if not isinstance(run_id, str) or not RUN_ID.fullmatch(run_id) or ".." in run_id:
        raise PlanError(f"run id {run_id!r}: use 1-128 letters, digits, '.', '_' or '-', starting with a letter or "
                        "digit (it names a folder; no '/' or '..')")
    return run_id


_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)  # "4" is not 4, NaN is not a number


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
    init_from: str | None = Field(None, description="Run id whose adapter this run starts from (phase chaining).")
    eval_batch: int | None = Field(None, ge=1, le=4096, description="Sequences per eval forward (default: micro_batch).")
    dpo_beta: float = Field(0.1, gt=0, le=100, description="DPO temperature (phase dpo).")
    grad_norm_limit: float = Field(10.0, gt=0, description="Gradient norm above which steps count as exploding.")
    grad_norm_patience: int = Field(3, ge=1, le=10_000, description="Consecutive exploding steps before a rollback.")
    grad_norm_min: float = Field(0.01, ge=0, description="Gradient norm below which an alert (only) is raised.")
    rollback_lr_factor: float = Field(0.5, gt=0, lt=1, description="LR scale after a rollback on bad gradients.")
    max_recoveries: int = Field(6, ge=0, le=1000, description="OOM re-plans + rollbacks before the run gives up.")
    sample_prompts: int = Field(3, ge=0, le=20, description="Test prompts to generate samples for.")
    max_new_tokens: int = Field(48, ge=1, le=4096, description="Tokens per sample generation.")
    watchdog: dict = Field(default_factory=dict, description="Watchdog thresholds (training/watchdog.py Thresholds), "
                                                             "e.g. {temperature_c: 80, stall_seconds: 600}.")

    @field_validator("init_from")
    @classmethod
    def _init_from(cls, v):
        return None if v is None else check_run_id(v)

    @field_validator("watchdog")
    @classmethod
    def _watchdog(cls, v: dict) -> dict:
        from training.watchdog import Thresholds

        Thresholds.from_train({"watchdog": v})  # unknown names -> a clear error
        return v

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps >= self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})")
        return self

    @property
    def effective_batch(self) -> int:
        return self.micro_batch * self.grad_accum


def _format_validation(err: ValidationError, source: str, lines: dict[str, int],
                       overridden: dict | None = None, override_source: str = "overrides", prefix: str = "") -> str:
    out = []
    for e in err.errors():
        loc = ".".join(str(x) for x in e["loc"])
        top = str(e["loc"][0]) if e["loc"] else ""
        parts = [str(x) for x in e["loc"]]
        line = None
        while parts and line is None:  # the deepest key the YAML has a line for
            line = lines.get(prefix + ".".join(parts))
            parts.pop()
        line = line or lines.get(prefix.rstrip("."))
        where = f"{source}:{line}" if line else source
        if overridden and top in overridden:
            where = f"{override_source} (over {source})"
        allowed = ""
        if e.get("ctx", {}).get("expected"):
            allowed = f" (allowed: {e['ctx']['expected']})"
        out.append(f"{where}: field {loc!r}: {e['msg']}{allowed}")
    return "\n".join(out)


def _key_lines(text: str) -> dict[str, int]:
    """Line number of every mapping key in a YAML text, by dotted path ("train.lora.r"), for error
    messages; {} when the text does not compose."""
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except Exception:  # only for messages: an unparsable text has its own error
        return {}
    out: dict[str, int] = {}
    stack = [(root, "")]
    while stack:
        node, prefix = stack.pop()
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                path = f"{prefix}{k.value}" if isinstance(k, yaml.ScalarNode) else prefix.rstrip(".")
                out.setdefault(path, k.start_mark.line + 1)
                stack.append((v, path + "."))
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                stack.append((v, f"{prefix.rstrip('.')}.{i}."))
    return out


class _StrictLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key written twice in one mapping (YAML says keys are unique;
    PyYAML keeps the last one silently)."""


def _mapping(loader: _StrictLoader, node: yaml.MappingNode, deep: bool = False) -> dict:
    loader.flatten_mapping(node)
    seen: dict = {}
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=deep)
        try:
            hash(key)
        except TypeError as exc:
            raise yaml.constructor.ConstructorError(None, None, f"a mapping key must be a plain value, got {key!r}",
                                                    key_node.start_mark) from exc
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} appears twice (first on line {seen[key] + 1})", key_node.start_mark)
        seen[key] = key_node.start_mark.line
    return loader.construct_mapping(node, deep=deep)


_StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _mapping)

MAX_YAML_BYTES = 4 << 20


def load_yaml(text: str, source: str) -> object:
    """Parse a config's YAML strictly: duplicate keys, anchors that expand beyond reason and
    non-finite numbers (.nan, .inf) are errors naming the line. PlanError otherwise."""
    if len(text) > MAX_YAML_BYTES:
        raise PlanError(f"{source}: {len(text):,} characters; a config is at most {MAX_YAML_BYTES:,}")
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise PlanError(f"{source}{line}: invalid YAML: {getattr(exc, 'problem', None) or exc}") from exc
    except RecursionError as exc:
        raise PlanError(f"{source}: nested too deeply") from exc
    try:
        bad = _bad_value(data)
    except PlanError as exc:
        raise PlanError(f"{source}: {exc}") from exc
    if bad:
        path, why = bad
        line = _key_lines(text).get(path)
        raise PlanError(f"{source}{f':{line}' if line else ''}: field {path!r}: {why}")
    return data


def _bad_value(v: object, path: str = "") -> tuple[str, str] | None:
    """(field, why) of the first value no config may hold: a non-finite number, a text that is not
    valid Unicode; PlanError for a document with more than 100,000 values (an alias bomb)."""
    stack = [(v, path)]
    seen = 0
    while stack:
        x, p = stack.pop()
        seen += 1
        if seen > 100_000:
            raise PlanError("a config with more than 100,000 values (an alias bomb?) is refused")
        if isinstance(x, float) and not math.isfinite(x):
            return p or "<document>", "not a finite number (.nan and .inf are refused)"
        if isinstance(x, str):
            try:
                x.encode("utf-8")
            except UnicodeEncodeError:
                return p or "<document>", "not valid Unicode (a lone surrogate escape)"
        if isinstance(x, dict):
            for k, val in x.items():
                if isinstance(k, str):
                    stack.append((k, f"{p} (a key)" if p else "<a key>"))
                stack.append((val, f"{p}.{k}" if p else str(k)))
        elif isinstance(x, list):
            stack.extend((val, f"{p}[{i}]") for i, val in enumerate(x))
    return None


def read_yaml_file(path: str | os.PathLike) -> tuple[object, str]:
    """(document, text) of a YAML config file; PlanError naming the file otherwise."""
    p = Path(path)
    try:
        if not p.is_file():
            raise PlanError(f"{p}: no such file (or not a regular file)")
        raw = p.read_bytes()
    except OSError as exc:
        raise PlanError(f"{p}: {exc.strerror}") from exc
    if len(raw) > MAX_YAML_BYTES:
        raise PlanError(f"{p}: {len(raw):,} bytes; a config is at most {MAX_YAML_BYTES:,}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise PlanError(f"{p}: not UTF-8 (byte {exc.start})") from exc
    return load_yaml(text, str(p)), text


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
        raise PlanError(_format_validation(exc, source, _key_lines(text), overrides, override_source, prefix)) from exc
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
        raise PlanError(_format_validation(exc, src, _key_lines(text))) from exc
    check_run_id(doc.run_id)
    ds = doc.dataset
    from training.dataset import DatasetError, version_dir

    try:
        version_dir("datasets", ds.get("name"), ds.get("content_hash"))
    except DatasetError as exc:
        raise PlanError(f"{src}:{_key_lines(text).get('dataset', 1)}: field 'dataset': {exc}") from exc
    cfg = train_config(doc.train, src, text, prefix="train.")
    out = doc.model_dump()
    out["train"] = cfg.model_dump()
    # dtype is set in one place: the plan's own (what the planner chose) or train.dtype (a person's
    # edit); both, disagreeing, is refused rather than one silently winning.
    lines = _key_lines(text)
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
    model: str = Field("smollm2", min_length=1, description="smollm2, tiny, or a local Hugging Face folder.")
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
        raise PlanError(_format_validation(exc, src, _key_lines(text))) from exc
    base = Path(path).resolve().parent
    files = []
    for d in [rc.data] if isinstance(rc.data, str) else rc.data:
        if not d.strip():
            raise PlanError(f"{src}:{_key_lines(text).get('data', 1)}: field 'data': an empty path")
        p = Path(d).expanduser()
        if not p.is_absolute():
            p = base / p
            real = p.resolve()
            if base not in real.parents:
                raise PlanError(f"{src}:{_key_lines(text).get('data', 1)}: field 'data': {d!r} leads out of "
                                f"{base}; give an absolute path for data that lives elsewhere")
        files.append(p)
    if not files:
        raise PlanError(f"{src}: field 'data': give at least one file")
    preset = rc.preset
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}", preset) or (base / preset).is_file():
        preset = str((base / preset) if not Path(preset).is_absolute() else Path(preset))
    cfg = load_config(preset, rc.overrides, f"{src}:{_key_lines(text).get('overrides', 1)}: overrides")
    return rc.model_copy(update={"preset": preset}), files, cfg


@dataclass
class ModelProfile:
    """What the planner needs from a model's config.json (no weights)."""

    model_type: str
    hidden: int
    layers: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, cfg: dict | str | os.PathLike) -> "ModelProfile":
        if not isinstance(cfg, dict):
            p = Path(cfg)
            if p.is_dir():
                p = p / "config.json"
            if not p.is_file():
                raise PlanError(f"{cfg}: no config.json (give a model folder or its config.json)")
            from training.dataset import parse_json

            try:
                cfg = parse_json(p.read_bytes().decode("utf-8-sig"), str(p))
            except UnicodeDecodeError as exc:
                raise PlanError(f"{p}: not UTF-8 (byte {exc.start})") from exc
            except ValueError as exc:
                raise PlanError(str(exc)) from exc
        if not isinstance(cfg, dict):
            raise PlanError("model config: expected a JSON object")
        if isinstance(cfg.get("text_config"), dict):
            cfg = cfg["text_config"]

        def shape(key: str, default: object = None, required: bool = True) -> int:
            v = cfg.get(key, default)
            if v is None and not required:
                return 0
            if v is None:
                raise PlanError(f"model config lacks {key!r} (needed to plan)")
            if isinstance(v, bool) or not isinstance(v, int) or not 0 < v <= 10**9:
                raise PlanError(f"model config field {key!r}: {v!r} is not a positive whole number (1..10^9)")
            return v

        hidden = shape("hidden_size")
        heads = shape("num_attention_heads")
        head_dim = shape("head_dim", required=False)
        if not head_dim:
            if hidden % heads:
                raise PlanError(f"model config: hidden_size {hidden} is not divisible by num_attention_heads {heads} "
                                "(and there is no head_dim)")
            head_dim = hidden // heads
        kv = shape("num_key_value_heads", required=False) or heads
        if heads % kv:
            raise PlanError(f"model config: num_attention_heads {heads} is not a multiple of num_key_value_heads {kv}")
        tied = cfg.get("tie_word_embeddings", False)
        return cls(model_type=str(cfg.get("model_type", "unknown"))[:64], hidden=hidden,
                   layers=shape("num_hidden_layers"), intermediate=shape("intermediate_size", required=False) or 4 * hidden,
                   heads=heads, kv_heads=kv, head_dim=head_dim, vocab=shape("vocab_size"),
                   tied_embeddings=tied if isinstance(tied, bool) else bool(tied))

    @property
    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each linear layer of one decoder block (Llama/Qwen2/Mistral shape)."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        q = self.heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, self.intermediate), "up_proj": (h, self.intermediate),
                "down_proj": (self.intermediate, h)}

    @property
    def block_params(self) -> int:
        return sum(i * o for i, o in self.linear_shapes.values()) + 2 * self.hidden

    @property
    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    @property
    def params(self) -> int:
        return self.layers * self.block_params + self.embedding_params + self.hidden

    def lora_params(self, lora: LoraSettings) -> int:
        shapes = self.linear_shapes
        names = shapes.keys() if lora.target_modules == "all-linear" else \
            [n for n in shapes if n in lora.target_modules]
        return self.layers * sum(lora.r * (shapes[n][0] + shapes[n][1]) for n in names)


def train_dtype(cfg: TrainConfig, device: str, bf16: bool) -> str:
    if cfg.dtype != "auto":
        return cfg.dtype
    if device == "cuda":
        return "bf16" if bf16 else "fp16"
    # CPU: bf16 where the CPU has it natively (LoRA and full fine-tunes; QLoRA's 4-bit CPU kernels in
    # bitsandbytes 0.50 are the ones with the AVX512-BF16 defect, so QLoRA stays fp32 there)
    return "bf16" if bf16 and cfg.method != "qlora" else "fp32"


def dtype_decision(cfg: TrainConfig, device: str, bf16: bool) -> str:
    dt = train_dtype(cfg, device, bf16)
    if cfg.dtype != "auto":
        extra = " (this GPU has no native bf16: it will be emulated, slowly)" if dt == "bf16" and device == "cuda" \
            and not bf16 else ""
        return f"dtype {dt}: set in the config{extra}"
    if device == "cuda":
        return ("dtype bf16: the GPU has native bf16 (compute capability 8.0 or newer)" if bf16 else
                "dtype fp16 with a loss scaler: the GPU has no native bf16 (compute capability below 8.0; "
                "torch.cuda.is_bf16_supported() would count emulation)")
    if dt == "bf16":
        return ("dtype bf16 on CPU: it has native bf16 (AVX512-BF16/AMX, probed); the frozen base is stored in bf16 and "
                "the LoRA parameters and optimizer state stay fp32 under bf16 autocast" if cfg.method != "full" else
                "dtype bf16 on CPU: native bf16 (AVX512-BF16/AMX, probed); fp32 master weights under bf16 autocast")
    if bf16:
        return "dtype fp32 on CPU: QLoRA's 4-bit CPU kernels are not used in bf16 (bitsandbytes 0.50's AVX512-BF16 defect)"
    return "dtype fp32 on CPU: no native bf16 (no AVX512-BF16/AMX, or a probe found bf16 no faster)"


def speed_decisions(device: str, vocab: int, dtype: str = "fp32", method: str = "lora") -> list[str]:
    """The plan's speed and precision decisions that are not the dtype or packing, each with its measured basis."""
    out = []
    if device != "cuda":
        out.append(f"loss head on CPU: duet's chunked log-softmax (training/fast_loss.py, {cpu_loss_chunk_tokens(vocab)}-"
                   f"token chunks x the {vocab:,}-token vocabulary) scores only the labelled positions through native "
                   "reductions; TRL's CPU fallback scores padding too and walks each logits tile about a dozen times "
                   "(measured 1.5x tokens/s on the demo's LoRA step)")
        if dtype == "bf16" and method == "lora":
            out.append("LoRA update added in fp32 (training/cpu_lora.py): the base layers' matmuls run in bf16, the "
                       "low-rank update and its sum with the base output in fp32; in bf16 most of an early update rounds "
                       "away (measured on the demo: eval loss 0.05 above the fp32 script's; 0.007 with the fp32 update, "
                       "for ~5 % of the speed); its dropout masks drawn 16 bits an element, three from each 64-bit "
                       "draw, where torch's CPU dropout draws one sample at a time (measured: ~2.96 -> ~2.64 s a "
                       "SmolLM2 LoRA step, dropout 0.05; DUET_CPU_FAST_DROPOUT=0 for torch's)")
        out.append("torch.compile off on CPU: inductor recompiled for each new padded batch length and 20 demo steps "
                   "took over 8 minutes on 2 cores, several times the eager run (measured, not kept)")
    else:
        out.append("Liger kernels, torch.compile and packing by default on CUDA: not yet measured on a GPU with this "
                   "stack, so off (Liger, compile) or by the padding rule (packing) until benchmarks/gpu_check.sh has")
    return out


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
CUDA_CONTEXT_BYTES = 500 * MIB
# A plan "fits" when its total stays under 85 % of the budget: below the 90 % VRAM alert
# (training/watchdog.py, infra/prometheus/rules.yml), so a run that keeps to its plan never alarms.
USABLE_FRACTION = 0.85
GPUS = {  # --gpu NAME: memory and bf16 support
    "rtx3060": (12 * GIB, True), "rtx3080": (10 * GIB, True), "rtx3090": (24 * GIB, True),
    "rtx4060ti": (16 * GIB, True), "rtx4070": (12 * GIB, True), "rtx4080": (16 * GIB, True),
    "rtx4090": (24 * GIB, True), "rtx5090": (32 * GIB, True), "t4": (15 * GIB, False), "v100": (16 * GIB, False),
    "a10": (24 * GIB, True), "l4": (24 * GIB, True), "a100-40": (40 * GIB, True), "a100-80": (80 * GIB, True),
    "h100": (80 * GIB, True), "h200": (141 * GIB, True),
}
NF4_DQ_BYTES = 4.127 / 8


# Measured with benchmarks/vram_planner.py through duet's own training path (CPU, TRL 1.16, torch 2.13):
QLORA_ACTIVATIONS = 0.80            # bitsandbytes' 4-bit matmul keeps fewer copies than a LoRA-wrapped Linear
CHECKPOINT_KEPT_CPU = 13            # with checkpointing on CPU, elements of h kept a token per layer (on CUDA: the
                                    # layer's input only, h; benchmarks/gpu_check.sh measures it there)
CHECKPOINT_KEPT_CPU_BF16 = 17       # the same under bf16 autocast on CPU (benchmarks/vram_planner.py: SmolLM2's shape,
                                    # 8 x 512 with checkpointing; autocast's bf16 copies sit beside the fp32 stream)
RUNTIME_CPU = 640 * MIB             # the process before any model: torch, transformers, TRL, datasets (measured: demo)
TRAINING_LOOP_CPU = 64 * MIB        # the trainer's own allocations during train() (optimizer setup, batches)
PACKED_SCORE_BYTES_CPU = 2          # per attention-score element of a packed row on CPU, bf16 (benchmarks/vram_planner.py:
                                    # packed minus unpacked at equal tokens, 1.8 on SmolLM2's shape (4 x 512) and
                                    # 2.3 on the tiny one (4 x 1024): the bf16 probabilities the backward keeps)
FUSED_TOKEN_TILE = 4096    # trl.kernels.chunked_logprob.TOKEN_CHUNK_SIZE (TRL 1.16)
FUSED_VOCAB_TILE = 32768   # trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE


# duet's CPU loss head (training/fast_loss.py) holds one token chunk of fp32 logits: 2**25 elements
# (128 MiB), so 682 tokens of a 49k vocabulary, 220 of a 152k one.
CPU_LOSS_CHUNK_ELEMENTS = 2 ** 25


def cpu_loss_chunk_tokens(vocab: int) -> int:
    return max(16, CPU_LOSS_CHUNK_ELEMENTS // max(1, vocab))


def loss_head_bytes(tokens: int, vocab: int, hidden: int, compute_bytes: int, device: str, *,
                    backward: bool = True) -> int:
    """SFT's and DPO's losses never materialize the logits of every token. On CUDA, TRL 1.16's fused
    LM head projects [4096 tokens x 32768 vocabulary] tiles in the compute dtype and a Triton kernel
    folds each tile in place. On CPU, duet's loss head (training/fast_loss.py) projects one chunk of
    tokens against the whole vocabulary: the chunk in the compute dtype, its fp32 upcast and one more
    fp32 tile (the softmax for the entropy metric, or the backward's gradient). The backward adds the
    fp32 gradient of the hidden states."""
    if device == "cuda":
        tile, per_element = min(tokens, FUSED_TOKEN_TILE) * min(vocab, FUSED_VOCAB_TILE), compute_bytes
    else:
        tile, per_element = min(tokens, cpu_loss_chunk_tokens(vocab)) * vocab, compute_bytes + 8
    return int(tile * per_element + (tokens * hidden * 4 if backward else 0))


def qlora_head_saving(model: ModelProfile, dtype: str) -> int:
    """Bytes a 16-bit QLoRA plan saves by keeping an untied lm_head in its dtype after peft upcasts
    it to fp32 (training.engine.load_train_model): the head is frozen, its values are exactly the
    checkpoint's 16-bit ones either way, and TRL's fused loss casts its tiles to the compute dtype, so
    fp32 storage buys nothing. The input embeddings stay fp32 (they set the residual stream's dtype)."""
    if dtype == "fp32" or model.tied_embeddings:
        return 0
    return model.vocab * model.hidden * 2


def estimate(cfg: TrainConfig, model: ModelProfile, device: str = "cuda", bf16: bool = True) -> dict[str, int]:
    """Peak memory estimate in bytes, by component (see the module docstring for the formulas)."""
    dt = train_dtype(cfg, device, bf16)
    wb = DTYPE_BYTES[dt]
    emb = model.embedding_params + model.hidden
    body = model.params - emb
    if cfg.method == "qlora":
        weights = body * NF4_DQ_BYTES + emb * 4 - qlora_head_saving(model, dt)
    elif cfg.method == "full":
        weights = model.params * 4  # the engine keeps fp32 weights and trains under bf16/fp16 autocast
    else:
        weights = model.params * wb
    trainable = model.params if cfg.method == "full" else model.lora_params(cfg.lora)
    if cfg.method == "full":
        trainable_bytes = trainable * (4 + 8)  # fp32 gradient + AdamW's fp32 m, v (the weights are above)
    else:  # PEFT keeps adapter weights in fp32: weight + grad + Adam m, v = 16 bytes in every dtype
        master = 4 if wb < 4 else 0
        trainable_bytes = trainable * (wb + wb + 8 + master)
    tokens = cfg.micro_batch * cfg.seq_len
    h, i = model.hidden, model.intermediate
    per_token = 22 * h + 5 * i
    if cfg.method != "full" and cfg.lora.dropout > 0 and cfg.phase != "dpo":  # DPOConfig.disable_dropout (TRL's default)
        per_token += 6 * h + i
    # what a layer keeps for its backward is in the compute dtype, except on CPU under bf16 autocast: the
    # residual stream stays fp32 there (LoRA's fp32 update, training/cpu_lora.py) and autocast keeps bf16
    # copies beside it (measured: the same bytes as an fp32 run, benchmarks/vram_planner.py)
    ab = 4 if device != "cuda" else wb
    per_layer_full = tokens * per_token * ab
    if cfg.method == "qlora":
        per_layer_full *= QLORA_ACTIVATIONS
    if cfg.gradient_checkpointing is True:
        kept = 1 if device == "cuda" else CHECKPOINT_KEPT_CPU_BF16 if wb == 2 else CHECKPOINT_KEPT_CPU
        activations = model.layers * tokens * kept * h * ab + per_layer_full
    else:
        activations = model.layers * per_layer_full
    pairs = 2 if cfg.phase == "dpo" else 1  # DPO: chosen + rejected in one batch
    breakdown = {
        "weights": int(weights),
        "trainable_and_optimizer": int(trainable_bytes),
        "activations": int(activations) * pairs,
        "loss_head": loss_head_bytes(tokens * pairs, model.vocab, h, wb, device),
    }
    if device != "cuda" and cfg.packing is True and cfg.phase == "sft":
        # a packed row on CPU: SDPA under its block-diagonal mask takes torch's math path and keeps the
        # heads x seq^2 scores of every layer for the backward; with checkpointing, two layers' (the recomputed
        # one and the forward's own; not measured: benchmarks/vram_planner.py has no packed run with checkpointing)
        kept_layers = 2 if cfg.gradient_checkpointing is True else model.layers
        breakdown["attention_scores"] = int(kept_layers * cfg.micro_batch * model.heads * cfg.seq_len ** 2
                                            * PACKED_SCORE_BYTES_CPU)
    if cfg.phase == "dpo":
        # the frozen reference (the adapter disabled on the same weights): a no-grad forward, one
        # layer's activations at a time, and its own fused-head tile
        breakdown["dpo_reference"] = int(per_layer_full * pairs + loss_head_bytes(tokens * pairs, model.vocab, h, wb,
                                                                                  device, backward=False))
    sub = sum(breakdown.values())
    if device == "cuda":
        breakdown["allocator_overhead"] = int(256 * MIB + 0.08 * sub)
        breakdown["cuda_context"] = CUDA_CONTEXT_BYTES
    else:
        breakdown["training_loop"] = int(TRAINING_LOOP_CPU)
        breakdown["overhead"] = int(RUNTIME_CPU)
    return breakdown


@dataclass
class Plan:
    config: TrainConfig
    model: ModelProfile
    device: str
    dtype: str
    breakdown: dict[str, int]
    budget_bytes: int
    trainable_params: int
    suggestions: list[dict]
    steps_per_epoch: int | None = None
    decisions: list[str] | None = None
    calibration: dict | None = None
    host_ram_bytes: int | None = None

    @cached_property
    def phases(self) -> dict:
        from training.plan_phases import phase_estimates

        return phase_estimates(self.config, self.model, self.device, self.dtype == "bf16", self.breakdown,
                               self.calibration["factor"] if self.calibration else 1.0,
                               host_ram_bytes=self.host_ram_bytes, budget_bytes=self.budget_bytes)

    @property
    def formula_bytes(self) -> int:
        return sum(self.breakdown.values())

    @property
    def total_bytes(self) -> int:
        """The estimate: the formula's total, scaled by a measured calibration factor when there is one
        (the factor applies to what the measurement saw: everything but the CUDA context)."""
        return scaled_total(self.breakdown, self.calibration["factor"] if self.calibration else 1.0)

    @property
    def fits(self) -> bool:
        """Training fits the budget, and every later phase fits where the engine will run it (the merge
        falls back to host RAM when the GPU has no room)."""
        if self.total_bytes > self.budget_bytes * USABLE_FRACTION:
            return False
        return all(p["where"] != "nowhere" for p in self.phases.values())

    def to_dict(self) -> dict:
        ctx = self.breakdown.get("cuda_context", 0)
        return {
            "train": self.config.model_dump(),
            "device": self.device, "dtype": self.dtype,
            "model": {"type": self.model.model_type, "params": self.model.params,
                      "layers": self.model.layers, "hidden": self.model.hidden, "vocab": self.model.vocab},
            "trainable_params": self.trainable_params,
            "effective_batch": self.config.effective_batch,
            "steps_per_epoch": self.steps_per_epoch,
            "estimate": {"breakdown_bytes": self.breakdown, "formula_bytes": self.formula_bytes,
                         "total_bytes": self.total_bytes, "torch_reserved_bytes": self.total_bytes - ctx,
                         "budget_bytes": self.budget_bytes, "fits": self.fits,
                         "usable_fraction": USABLE_FRACTION, "calibration": self.calibration,
                         "phases": self.phases,
                         "whole_run_bytes": max(p["total_bytes"] for p in self.phases.values())},
            "decisions": self.decisions or [],
            "suggestions": self.suggestions,
        }


def scaled_total(breakdown: dict[str, int], factor: float) -> int:
    """A breakdown's total with a calibration ``factor`` applied to the part a measurement sees
    (torch.cuda.max_memory_reserved() does not see the CUDA context, so the context is added as is)."""
    ctx = breakdown.get("cuda_context", 0)
    return int((sum(breakdown.values()) - ctx) * factor + ctx)


def measured_formula_bytes(breakdown: dict[str, int]) -> int:
    """The formula's bytes in the accounting of a measured peak: without the CUDA context."""
    return sum(breakdown.values()) - breakdown.get("cuda_context", 0)


def _similar(fact: dict, cfg: TrainConfig, model: ModelProfile, device: str, host: str | None) -> int | None:
    """How close a measured run is to this plan (lower is closer), or None if not comparable."""
    d = fact.get("data") or {}
    t = d.get("train") or {}
    if d.get("device") != device or (host and d.get("host") != host):
        return None
    if d.get("model_params") not in (None, model.params) or t.get("method") != cfg.method or t.get("phase") != cfg.phase:
        return None
    if not d.get("peak_bytes") or not d.get("formula_bytes"):
        return None
    return sum(t.get(k) != getattr(cfg, k) for k in ("micro_batch", "seq_len", "gradient_checkpointing", "packing")) + \
        (t.get("lora", {}).get("r") != cfg.lora.r)


def calibrate(cfg: TrainConfig, model: ModelProfile, device: str, host: str | None, facts: list[dict]) -> dict | None:
    """The closest measured run on the same host, model, method and phase -> a correction factor."""
    best = None
    for f in facts:
        dist = _similar(f, cfg, model, device, host)
        if dist is not None and (best is None or dist < best[0]):
            best = (dist, f)
    if best is None:
        return None
    d = best[1]["data"]
    # the run's peak against the formula of the configuration that ran (after any OOM re-plan), both
    # without the CUDA context; records written before duet kept that apart carry the context in
    # formula_bytes and the planned micro-batch in train
    factor = d["peak_bytes"] / d["formula_bytes"]
    return {"factor": round(factor, 4), "from_run": (best[1].get("provenance") or {}).get("run_id"),
            "measured_bytes": d["peak_bytes"], "formula_bytes_then": d["formula_bytes"], "distance": best[0],
            "note": f"scaled by the peak measured in run {(best[1].get('provenance') or {}).get('run_id')} on this host"}


def make_plan(cfg: TrainConfig, model: ModelProfile, *, device: str, bf16: bool, budget_bytes: int,
              train_examples: int | None = None, host: str | None = None, facts: list[dict] | None = None,
              token_p50: int | None = None, token_mean: float | None = None,
              host_ram_bytes: int | None = None) -> Plan:
    """Estimate ``cfg``; resolve ``gradient_checkpointing`` and ``packing`` ``auto``; when it does not
    fit, propose the nearest plans that do. ``facts``: cortex measurements that calibrate the
    estimate; ``token_p50``/``token_mean``: the dataset's median and mean example length in tokens.

    Packing chosen here replaces padding and nothing else: the packed micro-batch holds about as many
    examples as ``micro_batch`` unpacked rows would, so an optimizer step sees the same data (and the
    learning curve stays comparable) while the forward pass carries fewer, padding-free tokens."""
    decisions = []
    examples_per_step = cfg.effective_batch
    if cfg.packing == "auto":
        # CPU: off. SDPA on a CPU attends over a packed row under a dense block mask, seq_len^2 per row, and
        # that cost more than the padding it saves (benchmarks/speed.py: 0.82x tokens/s on the demo data)
        pack = cfg.phase == "sft" and device == "cuda" and token_p50 is not None and token_p50 <= cfg.seq_len // 2
        cfg = cfg.model_copy(update={"packing": pack})
        if pack:
            decisions.append(f"packing on: the median example is {token_p50} tokens of {cfg.seq_len}; padding each "
                             "batch to its longest would spend compute on padding")
            mean = max(1.0, token_mean or token_p50)
            rows = max(1, math.ceil(cfg.micro_batch * mean / cfg.seq_len))
            if rows < cfg.micro_batch:
                decisions.append(f"packed micro-batch {rows} x {cfg.seq_len} tokens: holds ~{rows * cfg.seq_len / mean:.0f} "
                                 f"examples of ~{mean:.0f} tokens where {cfg.micro_batch} unpacked rows held "
                                 f"{cfg.micro_batch}, so an optimizer step sees about the same data")
                # evaluation stays unpacked: it keeps the rows it had
                cfg = cfg.model_copy(update={"micro_batch": rows, "eval_batch": cfg.eval_batch or cfg.micro_batch})
            examples_per_step = cfg.effective_batch * cfg.seq_len / mean
        else:
            decisions.append("packing off: " + ("DPO pairs are not packed" if cfg.phase != "sft" else
                                                "on CPU, SDPA attends over a packed row under a dense block mask "
                                                "(seq_len^2 a row), which cost more than padding (measured 0.82x "
                                                "tokens/s on the demo data)" if device != "cuda" else
                                                "no token statistics" if token_p50 is None else
                                                f"the median example ({token_p50} tokens) fills over half of seq_len"))
    if cfg.gradient_checkpointing == "auto":
        off = cfg.model_copy(update={"gradient_checkpointing": False})
        bd_off = estimate(off, model, device, bf16)
        cal = calibrate(off, model, device, host, facts or [])
        total_off = scaled_total(bd_off, cal["factor"] if cal else 1.0)
        if total_off <= budget_bytes * USABLE_FRACTION:
            cfg = off
            decisions.append("gradient checkpointing off: the plan fits without it (it would cost ~30 % speed)")
        else:
            cfg = cfg.model_copy(update={"gradient_checkpointing": True})
            decisions.append(f"gradient checkpointing on: without it the estimate is {total_off / GIB:.2f} GiB")
    decisions.append(dtype_decision(cfg, device, bf16))
    decisions.extend(speed_decisions(device, model.vocab, train_dtype(cfg, device, bf16), cfg.method))
    if cfg.method == "qlora":
        dt = train_dtype(cfg, device, bf16)
        saved = qlora_head_saving(model, dt)
        decisions.append(
            f"QLoRA: lm_head kept in {dt} after peft's fp32 upcast, saving {saved / GIB:.2f} GiB (frozen, its values are "
            "the checkpoint's either way, and the fused loss computes in the compute dtype); the input embeddings "
            "stay fp32 (the residual stream's dtype)" if saved else
            "QLoRA: embeddings and lm_head in fp32 as peft upcasts them (" +
            ("an fp32 plan" if dt == "fp32" else "a tied head is the embedding matrix: kept fp32 for the residual stream")
            + ")")
    if device == "cuda":
        decisions.append(f"loss through TRL's fused LM head: {min(cfg.micro_batch * cfg.seq_len, FUSED_TOKEN_TILE)} x "
                         f"{min(model.vocab, FUSED_VOCAB_TILE)} tiles, never the {model.vocab:,}-wide logits of every "
                         "token; attention through SDPA's flash kernel (no heads x seq^2 scores)")
    bd = estimate(cfg, model, device, bf16)
    cal = calibrate(cfg, model, device, host, facts or [])
    plan = Plan(cfg, model, device, train_dtype(cfg, device, bf16), bd, budget_bytes,
                model.params if cfg.method == "full" else model.lora_params(cfg.lora), [],
                decisions=decisions, calibration=cal, host_ram_bytes=host_ram_bytes)
    merge = plan.phases["merge"]
    if merge["where"] == "nowhere":
        decisions.append(f"the merge needs ~{merge['total_bytes'] / GIB:.1f} GiB: more than the GPU has left and "
                         f"than the host's free RAM; the plan does not fit")
    elif merge["where"] == "cpu" and device == "cuda":
        decisions.append(f"the merge (~{merge['total_bytes'] / GIB:.1f} GiB) runs in host RAM: the GPU has no room")
    if cal:
        decisions.append(cal["note"] + f" (x{cal['factor']:.2f})")
    if train_examples:
        plan.steps_per_epoch = math.ceil(train_examples / examples_per_step)
    if not plan.fits:
        factor = cal["factor"] if cal else 1.0
        plan.suggestions = suggest(cfg, model, device=device, bf16=bf16, budget_bytes=budget_bytes, factor=factor)
    return plan


def suggest(cfg: TrainConfig, model: ModelProfile, *, device: str, bf16: bool, budget_bytes: int,
            factor: float = 1.0) -> list[dict]:
    """Nearest fitting variants, in order of how little they change: keep the effective batch
    (smaller micro-batch, more accumulation), then gradient checkpointing, then QLoRA, then a
    shorter sequence."""
    tries: list[tuple[str, dict]] = []
    mb, ga = cfg.micro_batch, cfg.grad_accum
    while mb > 1:
        mb //= 2
        ga *= 2
        tries.append((f"micro-batch {mb} x accumulation {ga} (same effective batch)",
                      {"micro_batch": mb, "grad_accum": ga}))
    base: dict = {}
    steps = [("gradient checkpointing", {"gradient_checkpointing": True})]
    if cfg.method != "qlora":
        steps.append(("QLoRA (4-bit base)", {"method": "qlora"}))
    for label, change in steps:
        base.update(change)
        tries.append((label, dict(base)))
        mb, ga = cfg.micro_batch, cfg.grad_accum
        while mb > 1:
            mb //= 2
            ga *= 2
            tries.append((f"{label}, micro-batch {mb} x accumulation {ga}",
                          {**base, "micro_batch": mb, "grad_accum": ga}))
    seq = cfg.seq_len
    while seq > 256:
        seq //= 2
        tries.append((f"QLoRA, gradient checkpointing, micro-batch 1, seq-len {seq}",
                      {**base, "micro_batch": 1, "grad_accum": cfg.effective_batch, "seq_len": seq}))
    out = []
    for label, change in tries:
        c2 = cfg.model_copy(update=change)
        bd = estimate(c2, model, device, bf16)
        total = scaled_total(bd, factor)
        if total <= budget_bytes * USABLE_FRACTION:
            out.append({"change": label, "set": change, "total_bytes": total, "breakdown_bytes": bd})
            if len(out) >= 3:
                break
    return out
