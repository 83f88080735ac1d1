"""The model and trainer duet trains with, as the planner counts them: ``load_train_model`` (the
base in the plan's dtype, 4-bit for QLoRA, plus a LoRA adapter) and ``build_trainer`` (TRL's
SFTTrainer or DPOTrainer, the one place their arguments are set). Shared by the engine, the merge
check and the benchmarks (benchmarks/vram_planner.py, benchmarks/speed.py)."""

from __future__ import annotations

import logging
from pathlib import Path

from training.config import TrainConfig
from training.plan.memory_model import duet_cpu_lora
from infra.lazy import lazy

torch = lazy("torch", extra="executor")


def packing_args(packing: bool) -> dict:
    """SFTConfig fields for a plan's ``packing``: TRL's padding-free best-fit packing with "bfd_split" (an
    example longer than seq_len is split across rows; "bfd" would drop the overflow), and evaluation left
    unpacked so eval losses compare across runs and plans."""
    return {"packing": True, "packing_strategy": "bfd_split", "eval_packing": False} if packing else {}


def torch_dtype(name: str):
    """The torch dtype of a plan's ``dtype`` ("fp32", "bf16", "fp16")."""
    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def load_train_model(path: Path, cfg: TrainConfig, *, device: str, dtype: str, adapter: Path | None = None,
                     device_index: int | None = None):
    """The model duet trains, as the planner counts it: the base in the plan's dtype (fp32 for a full
    fine-tune, trained under autocast; nf4 with double quantization for QLoRA, its other parameters
    upcast by peft), plus a new LoRA adapter or the given one. A 4-bit model is placed by
    bitsandbytes at load, on ``device_index`` (a data-parallel rank's GPU), else CUDA's current device
    (the Trainer never moves a quantized model)."""
    from peft import LoraConfig, PeftModel, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM

    tdt = torch_dtype(dtype)
    if cfg.method == "qlora" and device != "cuda":
        from infra import malloc

        malloc.small_mappings(True, for_process=True)  # see infra/malloc.py: the dequantized copies
    # A full fine-tune keeps fp32 weights and trains under bf16/fp16 autocast (mixed precision): fp16
    # weights cannot have their gradients unscaled, and bf16 weights lose small updates.
    if cfg.method == "qlora":
        model = load_nf4(path, dtype, device, device_index)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32 if cfg.method == "full" else tdt)
    if cfg.method == "qlora":
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=bool(cfg.gradient_checkpointing))
        head, emb = model.get_output_embeddings(), model.get_input_embeddings()
        if dtype != "fp32" and head is not None and head.weight is not emb.weight:
            head.weight.data = head.weight.data.to(tdt)  # lossless: see training.plan.planner.qlora_head_saving
    if cfg.method == "full":
        return model
    torch.manual_seed(cfg.seed)  # LoRA init draws from the RNG: same seed, same adapter
    if adapter is not None:
        return PeftModel.from_pretrained(model, adapter, is_trainable=True)
    lora = cfg.lora
    return get_peft_model(model, LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                                            target_modules=lora.target_modules, task_type="CAUSAL_LM"))


def build_trainer(model, tok, cfg: TrainConfig, *, phase: str, device: str, dtype: str, out: Path, max_steps: int,
                  evaluate: bool, save: bool, train_ds, eval_ds):
    """The TRL trainer duet trains with (SFT or DPO), from a train config: the one place its
    arguments are set, shared by the engine and the planner benchmark (benchmarks/vram_planner.py)."""
    on_cpu = device != "cuda"
    if on_cpu:  # TRL's fused LM head through duet's CPU path (training/run/fast_loss.py); cpu.fast_loss false: TRL's own
        from training.run import fast_loss

        fast_loss.set_enabled(cfg.cpu.fast_loss)
        if duet_cpu_lora(cfg, device, dtype):
            from training.run import cpu_lora  # LoRA's update added in fp32, its dropout (see that module and the planner)

            cpu_lora.install(model, fast_dropout=cfg.cpu.fast_dropout)
    common = dict(
        output_dir=str(out), max_steps=max_steps, per_device_train_batch_size=cfg.micro_batch,
        gradient_accumulation_steps=cfg.grad_accum,
        per_device_eval_batch_size=cfg.eval_batch or cfg.micro_batch,
        learning_rate=cfg.learning_rate, lr_scheduler_type=cfg.lr_scheduler,
        warmup_steps=min(cfg.warmup_steps, max(0, max_steps - 1)), max_length=cfg.seq_len,
        activation_checkpointing=bool(cfg.gradient_checkpointing), seed=cfg.seed, data_seed=cfg.seed,
        logging_steps=1, logging_nan_inf_filter=False,
        eval_strategy="steps" if evaluate else "no", eval_steps=cfg.eval_every,
        save_strategy="steps" if save else "no", save_steps=cfg.checkpoint_every, save_total_limit=None,
        report_to=[], disable_tqdm=True, dataloader_num_workers=0, use_cpu=on_cpu,
        ddp_find_unused_parameters=False,  # data parallel: LoRA uses every trainable parameter in each step
        bf16=dtype == "bf16", fp16=dtype == "fp16",
        # tokens/s counts real tokens: by attention mask when padded; a packed (padding-free) batch has
        # no padding and no mask, and "non_padding" would drop every real token equal to the pad id (EOS)
        include_num_input_tokens_seen="all" if cfg.packing and phase == "sft" else "non_padding",
    )
    # CPU SFT without packing: padding-free rows, attention example by example (training/run/padding_free.py)
    padding_free = False
    if on_cpu and phase == "sft" and not cfg.packing and cfg.cpu.padding_free:
        from training.run import padding_free as pf

        why = pf.install(model, cfg.seq_len)
        if why:  # the planner turns off what the model's config rules out; this is a model loaded otherwise
            logging.getLogger("duet.train").warning("padding-free batches off: %s; padded rows", why)
        else:  # every token of a padding-free row is real (EOS, which is also the pad id, included)
            padding_free = True
            common["include_num_input_tokens_seen"] = "all"
    if phase == "dpo":
        from trl import DPOConfig, DPOTrainer

        args = DPOConfig(beta=cfg.dpo_beta, **common)
        trainer = DPOTrainer(model=model, ref_model=None, args=args, train_dataset=train_ds,
                             eval_dataset=eval_ds, processing_class=tok)
    else:
        from trl import SFTConfig, SFTTrainer

        args = SFTConfig(**packing_args(cfg.packing), **common)
        trainer = SFTTrainer(model=model, args=args, train_dataset=train_ds, eval_dataset=eval_ds,
                             processing_class=tok)
        if padding_free:  # after TRL prepared (and truncated) the data and chose the pad token as for padded rows
            trainer.data_collator = pf.collator(trainer.data_collator)
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    keep_adapters_fp32(trainer.model, cfg)
    return trainer


def trainable_dtypes(model) -> list[str]:
    """The dtypes of the parameters that train ("float32", ...), sorted."""
    return sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.requires_grad})


def keep_adapters_fp32(model, cfg: TrainConfig) -> None:
    """LoRA's parameters train in fp32 in every plan (the planner counts 16 bytes each: weight, gradient
    and AdamW's two moments, training/plan/memory_model.py), as peft creates them. TRL 1.16's SFT and
    DPO trainers cast a 4-bit model's trainable parameters to bf16 when they are built (the QLoRA
    paper's recipe, sft_trainer.py / dpo_trainer.py), which the plan never chose and which, on a GPU
    without native bf16 (compute capability < 8.0), is not even the plan's fp16. Cast back before the
    optimizer exists (it is created in ``train()``), then check."""
    if cfg.method == "full":
        return
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.to(torch.float32)
    if trainable_dtypes(model) != ["float32"]:
        raise RuntimeError(f"LoRA parameters train in {trainable_dtypes(model)}, not the planned float32")


def load_nf4(path: Path, dtype: str, device: str, device_index: int | None = None):
    """A base in 4-bit nf4 with double quantization, its other parameters and its compute in ``dtype``,
    placed by bitsandbytes at load (on ``device_index``, else CUDA's current device), with the CPU
    kernel workaround applied: how QLoRA trains it and how serving loads it (training/serve/models.py)."""
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tdt = torch_dtype(dtype)
    kwargs: dict = {"dtype": tdt, "quantization_config": BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=torch.float32 if dtype == "fp32" else tdt)}
    if device == "cuda":
        kwargs["device_map"] = {"": torch.cuda.current_device() if device_index is None else device_index}
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    _bnb_cpu_workaround(model)
    return model


def _bnb_cpu_workaround(model) -> None:
    """bitsandbytes 0.50 on CPUs with AVX512-BF16 breaks training after an eval-mode forward of a
    4-bit layer unless the layer opts out of that kernel."""
    try:
        import bitsandbytes as bnb
    except ImportError:
        return
    for m in model.modules():
        if isinstance(m, bnb.nn.Linear4bit):
            m.support_avx512bf16_for_cpu = False


def load_datasets(version_dir: Path, phase: str, tok=None):
    """The (train, test) splits of a dataset version as the trainer reads them: messages, or DPO triples
    (with ``tok``: each conversation as its chat template takes it, training/data/dataset.for_template)."""
    from datasets import Dataset

    from training.data.dataset import for_template, load_split

    def fit(msgs: list[dict]) -> list[dict]:
        return for_template(tok, msgs) if tok is not None else msgs

    def rows(which: str) -> Dataset:
        recs = load_split(version_dir, which)
        if phase == "dpo":
            return Dataset.from_list([{"prompt": fit(r["prompt"]), "chosen": r["chosen"], "rejected": r["rejected"]}
                                      for r in recs])
        return Dataset.from_list([{"messages": fit(r["messages"])} for r in recs])

    return rows("train"), rows("test")


def load_tokenizer(path: Path):
    """The model's tokenizer, with EOS as its pad token when it has none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok
