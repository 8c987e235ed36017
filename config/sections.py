"""The run-config sections besides `model` (which lives in model/config.py).

Each section is a strict pydantic model: every field documents its unit, unknown keys are errors.
"""

from __future__ import annotations

from typing import Literal

from typing import Annotated, Any

from pydantic import ConfigDict, Field, NonNegativeFloat, ValidationInfo, field_validator, model_validator

from config.base import StrictModel
from model.config import MambaConfig


class SectionModel(StrictModel):
    """A run-config section: numbers must be finite (lr=.inf is a typo, not a setting) and true/false
    is not a number (pydantic would read micro_batch_size=true as 1)."""

    model_config = ConfigDict(**StrictModel.model_config, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_as_number(cls, value: Any, info: ValidationInfo) -> Any:
        annotation = cls.model_fields[info.field_name].annotation
        if isinstance(value, bool) and annotation in (int, float, int | None, float | None):
            raise ValueError(f"must be a number, not {str(value).lower()}")
        if info.field_name == "output_dir" and isinstance(value, str) and not value.strip():
            raise ValueError("must name a folder (empty would write into the current folder)")
        return value


class DataConfig(SectionModel):
    """Where training tokens come from and how they are cut into sequences."""

    manifest: str | None = Field(None, description="manifest.json written by pipeline/curate.py (required to train).")
    packing: Literal["document", "continuous"] = Field(
        "document",
        description="document: boundaries travel with each sequence (Mamba2 state/conv reset, attention "
        "masked per document, RoPE restarts, cross-document targets masked); continuous: plain "
        "EOS-separated concatenation.",
    )
    weights: dict[str, NonNegativeFloat] | None = Field(
        None,
        description="Source weights by name, replacing the manifest's (0 leaves a source out); sources not "
        "named keep the manifest's weight. Re-blends without re-curating.",
    )
    num_workers: int = Field(0, ge=0, description="DataLoader worker processes per rank.")
    verify: Literal["size", "sha256"] = Field(
        "size",
        description="Shard check at start-up: size compares every shard's bytes, token and document counts "
        "with the manifest (cheap); sha256 also hashes every shard (reads all data once, on each "
        "node's first rank).",
    )


class WandbConfig(SectionModel):
    """Weights & Biases logging. Offline unless mode=online (then WANDB_API_KEY must be set)."""

    project: str = Field("hybrid-lm", description="W&B project name.")
    mode: Literal["offline", "online", "disabled"] = Field(
        "offline", description="offline writes <output_dir>/wandb for a later `wandb sync`; disabled imports nothing."
    )
    name: str | None = Field(None, description="Run name; default: the last part of train.output_dir.")
    entity: str | None = Field(None, description="W&B team or user.")


class FP8Config(SectionModel):
    """Float8 training (train.precision=fp8, train/fp8.py, docs/fp8.md): which linear layers compute in float8."""

    recipe: Literal["tensorwise", "rowwise"] = Field(
        "tensorwise",
        description="torchao's dynamic scaling: tensorwise, one scale per tensor (Nemotron-H's per-tensor recipe; "
        "the faster one); rowwise, one per row (finer scales, slower GEMMs: fewer shapes pass the float8 rule).",
    )
    bf16_first_blocks: int = Field(
        1, ge=0, description="Blocks at the start of the stack kept in bf16 (Nemotron-H keeps the first and last "
        "GEMMs in BF16; Megatron-LM's default: one layer at each end)."
    )
    bf16_last_blocks: int = Field(
        1, ge=0, description="Blocks at the end of the stack kept in bf16 (the LM head always is)."
    )
    compile: bool = Field(
        True, description="torch.compile each float8 Linear (fuses torchao's casts into one pass; eager casts are "
        "several elementwise kernels per tensor)."
    )
    casts: Literal["torchao", "once"] = Field(
        "torchao", description="torchao: torchao's Float8Linear (casts per GEMM operand, keeps the bf16 input); "
        "once: train/fp8_linear.py, each tensor cast once in every layout its GEMMs need, the input kept in "
        "float8, weight gradients into train.grad_fold=fused_wgrad's float32 buffers (tensorwise only; not yet "
        "measured on a GPU: docs/fp8.md)."
    )
    weight_casts: Literal["call", "step"] = Field(
        "call", description="With casts=once: call, each weight cast at every forward and backward (as torchao); "
        "step, once per optimizer step into both layouts, kept for its micro-batches (2 bytes per float8 "
        "parameter of GPU memory; docs/fp8.md)."
    )

    @model_validator(mode="after")
    def _check(self) -> "FP8Config":
        if self.casts == "once" and self.recipe != "tensorwise":
            raise ValueError(f"casts=once implements the tensorwise recipe only, not recipe={self.recipe}: "
                             "set recipe=tensorwise or casts=torchao")
        if self.weight_casts == "step" and self.casts != "once":
            raise ValueError("weight_casts=step needs casts=once (torchao's Float8Linear casts its weight at every "
                             "call): set casts=once or weight_casts=call")
        return self


class TrainConfig(SectionModel):
    """Optimisation, schedule, checkpointing and logging of a pretraining run.

    The DeepSpeed config is `ds_config` (ZeRO stage, offload, bucket sizes) completed by the launcher
    with the batch, clipping, precision and optimizer numbers below, so each number lives in one place.
    """

    seq_len: int = Field(1024, ge=2, description="Tokens per training sequence.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per GPU per forward/backward.")
    global_batch_tokens: int = Field(
        524288, ge=1,
        description="Tokens per optimizer step over all ranks; must be a multiple of "
        "seq_len * micro_batch_size * world_size (the quotient is the accumulation).",
    )
    max_steps: int = Field(1000, ge=1, description="Optimizer steps of the whole run (the schedule's length).")
    lr: float = Field(3e-4, gt=0, description="Peak learning rate.")
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="Final lr as a fraction of the peak.")
    warmup_steps: int = Field(100, ge=0, description="Linear warm-up from lr/warmup_steps to lr.")
    schedule: Literal["cosine", "wsd", "constant"] = Field(
        "cosine",
        description="After warm-up: cosine to min_lr_ratio; wsd: constant, then a (1 - sqrt) cool-down over "
        "the last decay_fraction of the steps; constant: peak lr to the end.",
    )
    decay_fraction: float = Field(0.2, gt=0, le=1, description="WSD: share of max_steps spent cooling down.")
    weight_decay: float = Field(
        0.1, ge=0, description="AdamW decoupled decay of matrices; never of norms, biases, the input embedding "
        "or Mamba2 A_log/D/dt_bias."
    )
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW (beta1, beta2).")
    eps: float = Field(1e-8, gt=0, description="AdamW epsilon.")
    grad_clip: float = Field(1.0, ge=0, description="Max global grad norm; 0 disables clipping.")
    ds_config: str = Field(
        "ds_configs/zero2.json",
        description="DeepSpeed JSON (ZeRO stage, offload, buckets); a path, relative ones from the repo root.",
    )
    precision: Literal["bf16", "fp32", "fp8"] = Field(
        "bf16",
        description="Parameter/compute dtype (bf16: fp32 master weights); fp8: bf16 weights whose large linear layers "
        "compute in float8 (train.fp8, train/fp8.py; Ada/Hopper GPUs only).",
    )
    fp8: FP8Config = FP8Config()
    activation_checkpointing: Literal["none", "full", "attention", "mlp", "offload"] = Field(
        "none",
        description="What the backward recomputes (train/activation_checkpointing.py), for the blocks of "
        "checkpoint_block_types: full, each block; attention, each block's mixer (token-mixing layer); mlp, "
        "each block's MLP; offload, nothing recomputed but saved activations kept in CPU memory; none. "
        "true/false mean full/none.",
    )
    checkpoint_block_types: str | None = Field(
        None, min_length=1,
        description="Pattern letters of the blocks activation_checkpointing applies to (e.g. 'A' or 'MA'); "
        "default all.",
    )
    loss_chunk_tokens: int = Field(
        0, ge=0,
        description="Compute the LM head and loss over this many tokens at a time, recomputing each chunk's "
        "logits in the backward (model/loss.py: chunked_token_nll), so the (tokens x vocabulary) logits never exist "
        "whole; 0: all at once.",
    )
    cuda_graph: bool = Field(
        False,
        description="Replay each micro-batch's forward and backward as CUDA graphs (train/graph_step.py): "
        "removes the per-launch host cost that bounds small micro-batches. CUDA only; needs ZeRO "
        "stage 2, or stage 1 with bf16 and bf16.immediate_grad_update (ds_configs/zero1.json): their gradient "
        "hooks consume each backward's gradients before the next replay; and no "
        "activation checkpointing; with data.packing=document, flash-attn's varlen kernel "
        "(model.attn_backend auto or flash) and at most 512 documents per micro-batch (more: that "
        "micro-batch runs eagerly).",
    )
    context_parallel: int = Field(
        1, ge=1,
        description="Ranks each sequence is split over (context parallelism, model/context_parallel.py): a group of "
        "this many consecutive ranks holds seq_len / context_parallel consecutive tokens of every sequence each; "
        "Mamba2 layers pass their conv and SSM state from rank to rank and attention all-gathers keys and values, "
        "so the loss and gradients are those of whole sequences. Must divide the world size (data-parallel "
        "world = world size / context_parallel); seq_len must be a multiple of context_parallel x "
        "model.mamba.chunk_size; block types M, A and G; the Mamba2 conv and the attention run in PyTorch; "
        "not with cuda_graph. "
        "1: off.",
    )
    grad_fold: Literal["fused_wgrad", "copy_free", "deepspeed"] = Field(
        "fused_wgrad",
        description="How ZeRO-1's bf16 optimizer (bf16.immediate_grad_update, ds_configs/zero1.json) adds each "
        "micro-batch's gradients into its float32 buffers (train/grad_fold.py): fused_wgrad, the linear layers' "
        "weight-gradient GEMMs add into them directly and the other parameters fold without a float32 copy; "
        "copy_free, every parameter folds without the copy (bitwise DeepSpeed's sums); deepspeed, DeepSpeed's "
        "own fold. Other ZeRO settings always use DeepSpeed's own gradient handling.",
    )
    deterministic: bool = Field(
        False,
        description="Bitwise-reproducible steps on GPU (model/kernels.py make_deterministic): torch's "
        "deterministic algorithms, flash-attn's and mamba_ssm's deterministic backward, the Mamba2 conv in "
        "PyTorch instead of causal_conv1d. Slower; for checking exact resume and bisecting a divergence. "
        "CPU steps are reproducible without it.",
    )
    seed: int = Field(1234, description="Model init and RNG seed (the data order does not depend on it).")
    init_from: str | None = Field(
        None,
        description="Checkpoint folder (bundle or Hugging Face) whose weights start the run: continued pretraining, "
        "fine-tuning, context extension. Optimizer, schedule and data position start fresh; a resumed run ignores it.",
    )
    log_every: int = Field(1, ge=1, description="Steps between console lines (metrics.jsonl gets every step).")
    eval_every: int = Field(200, ge=0, description="Steps between validation losses; 0 disables.")
    eval_sequences: int = Field(
        64, ge=1, description="Validation sequences per evaluation over all ranks; the same set every time."
    )
    save_every: int = Field(500, ge=0, description="Steps between checkpoints; 0: only at the end/on signal.")
    save_final: bool = Field(
        True, description="Checkpoint and consolidated export at the last step; false for throughput-only runs "
        "(a signal still saves)."
    )
    keep_last: int = Field(3, ge=1, description="Complete checkpoints kept on disk.")
    output_dir: str = Field("runs/default", description="Checkpoints, metrics.jsonl and exports go here.")
    on_nan: Literal["skip", "stop"] = Field(
        "stop", description="Non-finite loss: skip the step (no update) or stop with an error naming step and rank."
    )
    plan_check: bool = Field(
        True,
        description="On CUDA, launch/pretrain.py estimates the per-GPU memory (train/plan.py) before the start-up "
        "and stops with the settings that would fit when the estimate exceeds the device; false starts anyway.",
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="Per-device dense bf16 peak for MFU (TFLOP/s); default: looked up by GPU name."
    )
    wandb: WandbConfig = WandbConfig()

    @field_validator("activation_checkpointing", mode="before")
    @classmethod
    def _checkpointing_bool(cls, value: Any) -> Any:
        """Configs written before the modes existed said true/false."""
        return {True: "full", False: "none"}.get(value, value) if isinstance(value, bool) else value

    @model_validator(mode="after")
    def _check(self) -> "TrainConfig":
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be <= max_steps ({self.max_steps})")
        per_step = self.seq_len * self.micro_batch_size
        if self.global_batch_tokens % per_step:
            raise ValueError(
                f"global_batch_tokens ({self.global_batch_tokens}) must be a multiple of "
                f"seq_len * micro_batch_size ({per_step})"
            )
        if not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"betas must lie in [0, 1), got {self.betas}")
        return self

    @property
    def global_batch_sequences(self) -> int:
        """Sequences per optimizer step over all ranks."""
        return self.global_batch_tokens // self.seq_len


class LoraConfig(SectionModel):
    """LoRA adapters (peft) of finetune.method=lora: W x + (alpha / r) B A x on the targeted Linears."""

    r: int = Field(16, ge=1, description="Rank of each adapter (A: r x in, B: out x r).")
    alpha: float = Field(32.0, gt=0, description="Scale numerator: the adapter's output is multiplied by alpha / r.")
    dropout: float = Field(0.0, ge=0, lt=1, description="Dropout on the adapter's input while training.")
    targets: list[str] = Field(
        default_factory=lambda: ["attention", "mamba_in", "mlp"], min_length=1,
        description="Which Linears get adapters, by kind (train/lora.py asks each block type and the MLP): "
        "attention (q/k/v/o), mamba_in, mamba_out (Mamba2 in_proj/out_proj), mlp (every MLP Linear).",
    )


class FinetuneConfig(SectionModel):
    """Fine-tuning of a checkpoint on JSON-lines records (launch/finetune.py, docs/finetune.md)."""

    method: Literal["full", "lora"] = Field("lora", description="full: every weight trains; lora: only adapters.")
    lora: LoraConfig = LoraConfig()
    data: str | None = Field(None, description="JSON-lines file of training records (launch/finetune.py --data).")
    val_data: str | None = Field(None, description="JSON-lines file of validation records; default: a val_fraction split.")
    val_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of `data` held out for the eval loss when val_data is not set "
        "(at least one record when > 0).")
    text_key: str = Field("text", description="Key of a plain-text record (loss on every token).")
    prompt_key: str = Field("prompt", description="Key of a record's prompt (no loss on its tokens).")
    response_key: str = Field("response", description="Key of a record's response (the loss is on its tokens and EOS).")
    bos: bool = Field(
        False, description="Prepend <s> to every record. Pretraining's documents carry no BOS (docs/data_contract.md: "
        "a document is its tokens then </s>), so the default matches what the checkpoint saw.")


class AdaptMambaConfig(MambaConfig):
    """Mamba2 sizes of the added paths: smaller defaults than a pretraining model's (they sit beside a
    full attention layer and are the only trained weights)."""

    d_state: int = Field(64, ge=1, description="SSM state size N per group.")
    expand: int = Field(1, ge=1, description="d_inner = expand * d_model.")


class AdaptConfig(SectionModel):
    """The hybrid wrapper of a pretrained transformer (adapt/, launch/adapt.py): its top `layers` decoder
    layers each gain a Mamba2 path, a per-channel gate (zero at init) and an optional memory bank beside
    the frozen attention; only those are trained, through the pretraining Trainer (train.*). With `base`
    set the architecture is the base's: a run config with a model section is refused; a manifest is read
    as continuous windows (data.packing is not read: the base's attention has no per-document mask)."""

    base: str | None = Field(None, description="Local Hugging Face folder of the decoder-only transformer "
                             "(Llama, Qwen2/3, Gemma families); --base sets it.")
    data: str | None = Field(None, description="Training text: a curation manifest.json (tokenized with the "
                             "base's tokenizer) or a .jsonl file of {\"text\": ...} records; --data sets it.")
    val_fraction: float = Field(
        0.05, ge=0, lt=1, description="Share of a .jsonl `data`'s windows held out for the eval loss (a manifest "
        "has its own validation split).")
    layers: int = Field(4, ge=1, description="How many of the top decoder layers gain the added paths.")
    memory_slots: int = Field(0, ge=0, description="Learned memory slots read by every token of an adapted "
                              "layer (0 = no memory bank).")
    mamba: AdaptMambaConfig = Field(AdaptMambaConfig(), description="The added Mamba2 paths' sizes (d_model is "
                                    "the base's hidden size).")


class EvalConfig(SectionModel):
    """Evaluation with eval/run.py: lm-evaluation-harness benchmarks and validation perplexity."""

    benchmarks: list[str] = Field(
        default_factory=lambda: ["standard"],
        description="lm-eval task/group/tag names, 'standard' (the design's suite), 'val_ppl', 'passkey' or "
        "'position_ppl' (eval/long_context.py).",
    )
    num_fewshot: int | None = Field(None, ge=0, description="Few-shot examples; None: each task's default.")
    limit: int | None = Field(None, ge=1, description="Examples per task, windows for val_ppl (debugging).")
    batch_size: int = Field(8, ge=1, description="Sequences per forward pass.")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (cuda when available, else cpu), cpu, cuda or cuda:N.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights/activations dtype; auto keeps the checkpoint's dtype."
    )
    tasks_dir: str | None = Field(None, description="Folder of local lm-eval task YAMLs (+ their data files).")
    output: str | None = Field(None, description="Results JSON; default <checkpoint>/eval_results.json.")
    manifest: str | None = Field(None, description="Curation manifest for val_ppl; default data.manifest.")
    val_seq_len: int | None = Field(None, ge=2, description="Tokens per val_ppl window; default train.seq_len.")
    allow_code_execution: bool = Field(
        False, description="Run benchmarks that execute model-written code (HumanEval); adds it to 'standard'."
    )
    compare: bool = Field(False, description="Add published scores of similar-size models to the table.")
    cache: bool = Field(
        True, description="Keep per-request results in a sqlite cache beside the output so a rerun resumes."
    )
    passkey_lengths: list[Annotated[int, Field(ge=2)]] = Field(
        default_factory=lambda: [1024 << k for k in range(8)], min_length=1,
        description="passkey: prompt lengths in tokens (default 1K..128K, doubling).",
    )
    passkey_depths: list[Annotated[float, Field(ge=0.0, le=1.0)]] = Field(
        default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0], min_length=1,
        description="passkey: where the key sits, as a fraction of the filler text (0 start, 1 end).",
    )
    passkey_samples: int = Field(4, ge=1, description="passkey: keys per (length, depth) cell.")
    position_ppl_seq_len: int | None = Field(
        None, ge=2, description="position_ppl: tokens per window; default the longest of eval.passkey_lengths.",
    )
    position_buckets: int = Field(6, ge=1, description="position_ppl: doubling position buckets per window.")
    position_ppl_windows: int = Field(4, ge=1, description="position_ppl: windows scored (from the validation split).")


class SamplingConfig(SectionModel):
    """Decoding defaults of launch/generate.py (its flags override them). temperature 0 = greedy."""

    max_new_tokens: int = Field(128, ge=0, description="Tokens generated per prompt at most.")
    temperature: float = Field(0.8, ge=0, description="Softmax temperature; 0 picks the argmax.")
    top_k: int = Field(0, ge=0, description="Keep the k most likely tokens; 0 keeps all.")
    top_p: float = Field(0.95, gt=0, le=1, description="Nucleus: smallest set with this probability mass.")
    repetition_penalty: float = Field(1.0, gt=0, description="> 1 discourages tokens already in the row.")
    stop: list[str] = Field(default_factory=list, description="Stop strings (cut from the output).")
    seed: int | None = Field(1234, description="Sampling seed; None: nondeterministic.")


class ExportConfig(SectionModel):
    """Export targets (launch/export.py) and inference settings (launch/generate.py)."""

    formats: list[Literal["hf", "onnx", "int8", "nf4", "int4"]] = Field(
        default_factory=lambda: ["hf"], description="Formats written when --format is not given."
    )
    output_dir: str = Field("exports", description="Output folder when --output is not given.")
    device: str = Field(
        "auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$",
        description="auto (cuda when available, else cpu), cpu, cuda or cuda:N.",
    )
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weights dtype of exports and generation; auto keeps the checkpoint's dtype."
    )
    verify: bool = Field(True, description="Measure parity/perplexity/speed during export (the card's numbers).")
    parity_tokens: int = Field(64, ge=1, description="Prompt length of the parity checks (tokens).")
    parity_new_tokens: int = Field(16, ge=1, description="Greedy tokens compared between runtimes.")
    onnx_opset: int | None = Field(None, ge=18, description="ONNX opset; None: torch.onnx's default.")
    int8_backend: Literal["torchao", "bitsandbytes"] = Field(
        "torchao", description="int8 weight-only: torchao Int8Tensor or bitsandbytes LLM.int8 (threshold 0)."
    )
    quant_group_size: Literal[32, 64, 128, 256] = Field(
        64, description="Weights per scale: NF4 block size and int4 group size (must divide in-features)."
    )
    eval_text: str | None = Field(None, description="Text file for perplexity when no manifest is given.")
    cuda_graph: bool | Literal["auto"] = Field(
        "auto", description="Generation decodes through a static cache replayed as one CUDA graph per token "
        "(model/decode_graph.py): auto = on for CUDA devices (the same greedy tokens, many times faster per "
        "token: see docs/performance.md), true = CUDA only, false = eager steps."
    )
    eval_tokens: int = Field(8192, ge=2, description="Validation tokens scored for perplexity at most.")
    eval_seq_len: int = Field(256, ge=2, description="Tokens per perplexity window.")
    throughput_new_tokens: int = Field(32, ge=1, description="Decode steps timed for tokens/s.")
    sampling: SamplingConfig = SamplingConfig()
