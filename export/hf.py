"""Our checkpoint <-> a transformers `BambaForCausalLM` folder (no custom code needed to load it); import
also of `GraniteMoeHybridForCausalLM` folders (dense Granite 4.0-H, export/granite.py).

Why Bamba (transformers 5.23; the other hybrids read and rejected):
  - Bamba: every decoder layer = pre-norm mixer (Mamba2 or GQA attention, chosen per layer by
    `attn_layer_indices`) + pre-norm SwiGLU MLP, RMSNorm, no biases (`attention_bias`, `mlp_bias`,
    `mamba_proj_bias` False), Mamba2 with mamba_ssm's in_proj order [z, x, B, C, dt], conv bias,
    grouped gated RMSNorm with norm_before_gate=False, dt_bias/A_log/D, `time_step_limit`,
    tied or untied embeddings. That is our block exactly.
  - NemotronH: mixer and MLP are separate layers and its MLP is a non-gated relu^2 (no SwiGLU).
  - FalconH1: attention and Mamba2 run in parallel inside every layer, with muP multipliers.
  - GraniteMoeHybrid: MoE/shared-MLP blocks and embedding/residual/logit multipliers (imported when dense:
    export/granite.py; a model with model.scales or without RoPE is refused by the Bamba export).
  - Zamba2: shared attention blocks re-applied with LoRA adapters.
  None of them has per-head QK-norm, so a `qk_norm` model is refused (ExportError).

Mapping (per layer i, our key -> Bamba key):
    embed.weight                 model.embed_tokens.weight
    layers.i.mixer_norm.weight   model.layers.i.input_layernorm.weight
    layers.i.mixer.*             model.layers.i.mamba.*     (pattern char 'M': same names as ours)
                                 model.layers.i.self_attn.* (pattern char 'A': q/k/v/o_proj)
    layers.i.mlp_norm.weight     model.layers.i.pre_ff_layernorm.weight
    layers.i.mlp.{gate,up,down}_proj.weight   model.layers.i.feed_forward.{gate,up,down}_proj.weight
    final_norm.weight            model.final_layernorm.weight
    lm_head.weight               lm_head.weight (untied only)
Config: the pattern's 'A' positions become `attn_layer_indices`; RoPE is rotate-half over the full
head (`rope_parameters.partial_rotary_factor = 1.0` given explicitly: BambaConfig otherwise defaults
to 0.5), `head_dim` is written (Bamba reads it with getattr), `rms_norm_eps` is both the block
norms' and the gated norm's eps, as in ours. The HF vocabulary is our padded one (a multiple of
128), so the round trip is bit-exact; the padding ids are listed in generation_config.json's
`suppress_tokens`, so `generate()` never samples them. RoPE scaling (model.attention.rope_scaling)
travels as rope_parameters: linear and yarn under their names, static ntk as plain RoPE at its raised
base (`hf_rope_parameters`); transformers computes the same tables. Our resolved ModelConfig travels in
`hybrid_lm_config.json` beside config.json (init-only fields, the true vocab size).
Known difference: with a non-default `dt_limit`, Bamba's decode step (`selective_state_update`,
torch fallback and mamba_ssm alike) does not clamp dt; prefill/forward do. The exporter warns.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import math
import re
from pathlib import Path
from typing import Any, Iterator

import torch

from config.atomic import atomic_write_json
from export import ExportError
from export.granite import MODEL_TYPE as GRANITE_TYPE
from export.granite import granite_to_bamba_names, model_config_from_granite
from model.config import ATTENTION, MAMBA, ModelConfig
from model.hybrid import HybridLM
from model.mixers import block_type
from model.mlps import mlp_type
from model.weights import CheckpointError, check_state_dict

log = logging.getLogger(__name__)

OUR_CONFIG_NAME = "hybrid_lm_config.json"
HF_ARCHITECTURE = "BambaForCausalLM"

_BLOCK_RENAMES = {  # ours -> Bamba, inside one layer
    "mixer_norm.": "input_layernorm.",
    "mlp_norm.": "pre_ff_layernorm.",
    "mlp.": "feed_forward.",
}
_TOP_RENAMES = {
    "embed.weight": "model.embed_tokens.weight",
    "final_norm.weight": "model.final_layernorm.weight",
    "lm_head.weight": "lm_head.weight",
}
_LAYER_KEY = re.compile(r"^layers\.(\d+)\.(.+)$")
_HF_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


# transformers' BambaRMSNormGated normalizes each SSM group on its own (as mamba_ssm and our model do) from 5.23;
# before, over all of d_inner at once: a different model whenever mamba.n_groups > 1
GROUPED_GATED_NORM_SINCE = "5.23.0"


def check_exportable(cfg: ModelConfig) -> None:
    """Raise ExportError when Bamba (of the installed transformers) cannot represent `cfg` exactly."""
    for letter in dict.fromkeys(cfg.layer_pattern):
        mixer = block_type(letter)
        if mixer.hf_layer_type is None:
            raise ExportError(
                f"cannot export block type {letter} ({mixer.name}) to Hugging Face: no transformers class expresses "
                "it; use --format onnx if it supports it, or keep the consolidated checkpoint"
            )
    if cfg.extensions():
        raise ExportError(f"cannot export {' and '.join(cfg.extensions())} to Hugging Face: Bamba has no such part; keep the consolidated "
                          "checkpoint")
    if not mlp_type(cfg.mlp).hf_export:
        raise ExportError(f"cannot export MLP kind {cfg.mlp} to Hugging Face: Bamba's MLP is SwiGLU; keep the "
                          "consolidated checkpoint, or use --format onnx")
    if cfg.attention.qk_norm:
        raise ExportError(
            "cannot export a qk_norm model to Hugging Face: BambaAttention (the closest transformers "
            "hybrid) has no per-head q/k RMSNorm; use --format onnx or a quantized format instead"
        )
    if not cfg.scales.is_default or not cfg.attention.rope:
        raise ExportError(
            "cannot export a model with model.scales multipliers or attention.rope=false (e.g. imported from "
            "Granite 4.0-H) to Hugging Face: Bamba has neither; use --format onnx or a quantized format instead"
        )
    if cfg.mamba.n_groups > 1 and not bamba_norms_per_group():
        import transformers

        raise ExportError(
            f"cannot export mamba.n_groups={cfg.mamba.n_groups} with transformers {transformers.__version__}: its "
            f"BambaForCausalLM normalizes the gated RMSNorm over all groups at once (per group from "
            f"{GROUPED_GATED_NORM_SINCE}), so it would compute another model; install transformers>="
            f"{GROUPED_GATED_NORM_SINCE} (requirements.txt pins it)")


def bamba_norms_per_group() -> bool:
    """Whether the installed transformers' Bamba normalizes each SSM group on its own (GROUPED_GATED_NORM_SINCE)."""
    import transformers
    from packaging.version import Version

    return Version(transformers.__version__) >= Version(GROUPED_GATED_NORM_SINCE)


def hf_key(key: str, pattern: str) -> str:
    """Our state-dict key -> Bamba's."""
    if key in _TOP_RENAMES:
        return _TOP_RENAMES[key]
    m = _LAYER_KEY.match(key)
    if m is None:
        raise ExportError(f"no Hugging Face name for tensor {key}")
    i, rest = int(m.group(1)), m.group(2)
    if rest.startswith("mixer."):
        sub = {"mamba": "mamba.", "attention": "self_attn."}[block_type(pattern[i]).hf_layer_type]
        return f"model.layers.{i}.{sub}{rest[len('mixer.'):]}"
    for ours, theirs in _BLOCK_RENAMES.items():
        if rest.startswith(ours):
            return f"model.layers.{i}.{theirs}{rest[len(ours):]}"
    raise ExportError(f"no Hugging Face name for tensor {key}")


def our_key(key: str) -> str:
    """Bamba's state-dict key -> ours (inverse of `hf_key`)."""
    for ours, theirs in _TOP_RENAMES.items():
        if key == theirs:
            return ours
    m = _HF_LAYER_KEY.match(key)
    if m is None:
        raise ExportError(f"unexpected tensor {key} in the Hugging Face checkpoint")
    i, rest = m.group(1), m.group(2)
    for prefix in ("mamba.", "self_attn."):
        if rest.startswith(prefix):
            return f"layers.{i}.mixer.{rest[len(prefix):]}"
    for ours, theirs in _BLOCK_RENAMES.items():
        if rest.startswith(theirs):
            return f"layers.{i}.{ours}{rest[len(theirs):]}"
    raise ExportError(f"unexpected tensor {key} in the Hugging Face checkpoint")


def hf_rope_parameters(cfg: ModelConfig) -> dict[str, Any]:
    """Bamba's rope_parameters for our RoPE (transformers' modeling_rope_utils computes the same tables):
    linear and yarn by name; ntk (static) as plain RoPE at its raised base, which is what it is."""
    a, s = cfg.attention, cfg.attention.rope_scaling
    plain = {"rope_type": "default", "rope_theta": a.rope_theta, "partial_rotary_factor": 1.0}
    if s is None:
        return plain
    if s.type == "ntk":
        return {**plain, "rope_theta": a.rope_theta * s.factor ** (cfg.head_dim / (cfg.head_dim - 2))}
    if s.type == "linear":
        return {**plain, "rope_type": "linear", "factor": s.factor}
    return {**plain, "rope_type": "yarn", "factor": s.factor, "original_max_position_embeddings": s.original_max_seq_len,
            "beta_fast": s.beta_fast, "beta_slow": s.beta_slow}


def rope_scaling_from_hf(rope: dict[str, Any], max_position_embeddings: int) -> dict[str, Any] | None:
    """Our model.attention.rope_scaling for Bamba's rope_parameters (None: plain RoPE); ExportError for
    what ours cannot express."""
    kind = rope.get("rope_type", "default")
    if kind == "default":
        return None
    factor = float(rope.get("factor") or 1.0)
    original = rope.get("original_max_position_embeddings") or max(2, round(max_position_embeddings / factor))
    if kind == "linear":
        return {"type": "linear", "factor": factor, "original_max_seq_len": original}
    unsupported = [k for k in ("attention_factor", "mscale", "mscale_all_dim") if rope.get(k) is not None]
    if kind == "yarn" and not unsupported and rope.get("truncate", True):
        return {"type": "yarn", "factor": factor, "original_max_seq_len": original,
                "beta_fast": float(rope.get("beta_fast") or 32), "beta_slow": float(rope.get("beta_slow") or 1)}
    detail = f" with {', '.join(unsupported) or 'truncate=false'}" if kind == "yarn" else ""
    raise ExportError(f"this Bamba checkpoint has no equivalent in our model: rope_type {kind}{detail} "
                      "(ours: default, linear, yarn)")


def bamba_config(cfg: ModelConfig, dtype: torch.dtype, special_ids: dict[str, int | None]) -> Any:
    """The BambaConfig that represents `cfg` (vocab = our padded vocab)."""
    from transformers import BambaConfig

    m, a = cfg.mamba, cfg.attention
    return BambaConfig(
        architectures=[HF_ARCHITECTURE],
        vocab_size=cfg.padded_vocab_size,
        tie_word_embeddings=cfg.tie_embeddings,
        hidden_size=cfg.d_model,
        intermediate_size=cfg.ffn_hidden,
        num_hidden_layers=cfg.n_layers,
        attn_layer_indices=[i for i, k in enumerate(cfg.layer_pattern) if block_type(k).hf_layer_type == "attention"],
        num_attention_heads=a.n_heads,
        num_key_value_heads=a.n_kv_heads,
        head_dim=cfg.head_dim,
        rope_parameters=hf_rope_parameters(cfg),
        max_position_embeddings=cfg.max_seq_len,
        rms_norm_eps=cfg.norm_eps,
        hidden_act="silu",
        attention_bias=False,
        mlp_bias=False,
        mamba_n_heads=cfg.n_ssm_heads,
        mamba_d_head=m.headdim,
        mamba_n_groups=m.n_groups,
        mamba_d_state=m.d_state,
        mamba_d_conv=m.d_conv,
        mamba_expand=m.expand,
        mamba_chunk_size=m.chunk_size,
        mamba_conv_bias=m.conv_bias,
        mamba_proj_bias=False,
        time_step_limit=list(m.dt_limit),
        initializer_range=cfg.resolved_init_std,
        dtype=str(dtype).removeprefix("torch."),
        **special_ids,
    )


def read_hf_config(folder: str | Path) -> Any:
    """The folder's BambaConfig or GraniteMoeHybridConfig (ExportError for another model_type or no config.json)."""
    from transformers import BambaConfig, GraniteMoeHybridConfig

    path = Path(folder) / "config.json"
    if not path.is_file():
        raise ExportError(f"{folder} is not a Hugging Face model folder (no config.json)")
    model_type = json.loads(path.read_text()).get("model_type")
    classes = {"bamba": BambaConfig, GRANITE_TYPE: GraniteMoeHybridConfig}
    if model_type not in classes:
        raise ExportError(f"only Bamba and GraniteMoeHybrid checkpoints can be imported, {folder} holds "
                          f"model_type={model_type!r}")
    return classes[model_type].from_pretrained(str(folder))


def model_config_from_hf(hf: Any) -> ModelConfig:
    """Our ModelConfig of a config `read_hf_config` returned (ExportError where ours cannot represent it)."""
    return model_config_from_granite(hf) if hf.model_type == GRANITE_TYPE else model_config_from_bamba(hf)


def model_config_from_bamba(hf: Any) -> ModelConfig:
    """Derive our ModelConfig from a BambaConfig; ExportError where ours cannot represent it."""
    rope = hf.rope_parameters or {}
    scaling = rope_scaling_from_hf(rope, hf.max_position_embeddings)
    problems = []
    if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
        problems.append(f"partial_rotary_factor {rope['partial_rotary_factor']} (ours rotates the full head)")
    for flag in ("attention_bias", "mlp_bias", "mamba_proj_bias"):
        if getattr(hf, flag):
            problems.append(f"{flag}=true")
    if hf.hidden_act != "silu":
        problems.append(f"hidden_act {hf.hidden_act}")
    if problems:
        raise ExportError("this Bamba checkpoint has no equivalent in our model: " + ", ".join(problems))
    attn = set(hf.attn_layer_indices or [])
    return ModelConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        pattern="".join(ATTENTION if i in attn else MAMBA for i in range(hf.num_hidden_layers)),
        ffn_hidden=hf.intermediate_size,
        attention={
            "n_heads": hf.num_attention_heads,
            "n_kv_heads": hf.num_key_value_heads,
            "head_dim": getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
            "rope_theta": rope.get("rope_theta", 10000.0),
            "rope_scaling": scaling,
        },
        mamba={
            "d_state": hf.mamba_d_state, "headdim": hf.mamba_d_head, "expand": hf.mamba_expand,
            "n_groups": hf.mamba_n_groups, "d_conv": hf.mamba_d_conv, "chunk_size": hf.mamba_chunk_size,
            "conv_bias": hf.mamba_conv_bias, "dt_limit": tuple(hf.time_step_limit or (0.0, math.inf)),
        },
        norm_eps=hf.rms_norm_eps,
        tie_embeddings=hf.tie_word_embeddings,
        max_seq_len=hf.max_position_embeddings,
    )


def to_hf_state_dict(model: HybridLM) -> dict[str, torch.Tensor]:
    """Our weights under Bamba's names (tied head omitted, as transformers expects)."""
    pattern = model.cfg.layer_pattern
    return {hf_key(k, pattern): v.detach().contiguous().cpu() for k, v in model.state_dict().items()}


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Bamba's weights under our names; the vocabulary rows are zero-padded to a multiple of 128."""
    ours = {our_key(k): v for k, v in state.items()}
    if cfg.tie_embeddings:
        ours.pop("lm_head.weight", None)  # some writers store the tied head anyway
    for name in ("embed.weight", "lm_head.weight"):
        if name in ours and ours[name].size(0) < cfg.padded_vocab_size:
            w = ours[name]
            ours[name] = torch.cat([w, w.new_zeros(cfg.padded_vocab_size - w.size(0), w.size(1))])
    return ours


def write_hf_tokenizer(tokenizer: Any, out_dir: Path, max_len: int) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens, left padding) for AutoTokenizer."""
    tokenizer.model_max_length = max_len
    tokenizer.padding_side = "left"
    tokenizer.init_kwargs["padding_side"] = "left"  # save_pretrained writes init_kwargs, not the attribute
    tokenizer.save_pretrained(str(out_dir))


def export_hf(model: HybridLM, tokenizer: Any, out_dir: str | Path) -> Path:
    """Write `model` + tokenizer as a BambaForCausalLM folder loadable by AutoModelForCausalLM."""
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    cfg = model.cfg
    check_exportable(cfg)
    if tuple(cfg.mamba.dt_limit) != (0.0, math.inf):
        log.warning("dt_limit %s: transformers' Bamba decode step does not clamp dt (its prefill does)", cfg.mamba.dt_limit)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    special = {"pad_token_id": tokenizer.pad_token_id, "bos_token_id": tokenizer.bos_token_id,
               "eos_token_id": tokenizer.eos_token_id}
    dtype = model.embed.weight.dtype
    hf_cfg = bamba_config(cfg, dtype, special)
    hf_cfg.save_pretrained(str(out))
    tmp = out / ".model.safetensors.tmp"
    save_file(to_hf_state_dict(model), str(tmp), metadata={"format": "pt"})
    tmp.replace(out / "model.safetensors")
    padding_ids = list(range(cfg.vocab_size, cfg.padded_vocab_size))
    gen = GenerationConfig(**special, suppress_tokens=padding_ids or None)
    gen.save_pretrained(str(out))
    write_hf_tokenizer(tokenizer, out, cfg.max_seq_len)
    atomic_write_json(out / OUR_CONFIG_NAME, cfg.model_dump(mode="json"))
    return out


# transformers' Bamba / GraniteMoeHybrid module functions that call causal_conv1d / mamba_ssm whenever those import
HF_KERNEL_FUNCS = ("causal_conv1d_fn", "causal_conv1d_update", "mamba2_split_conv1d_scan_combined",
                   "mamba2_selective_state_update", "mamba2_chunk_scan")


@contextlib.contextmanager
def hf_torch_ops() -> Iterator[None]:
    """Run transformers' Bamba and GraniteMoeHybrid on their PyTorch code inside the block. They pick
    causal_conv1d / mamba_ssm by what imports, not by the tensors' device, so on the CPU of a machine that
    has them (a GPU node, the Docker image) their CUDA-only kernels raise `Expected x.is_cuda() to be true`."""
    from transformers.models.bamba import modeling_bamba
    from transformers.models.granitemoehybrid import modeling_granitemoehybrid

    saved = [(module, name, getattr(module, name)) for module in (modeling_bamba, modeling_granitemoehybrid)
             for name in HF_KERNEL_FUNCS if hasattr(module, name)]
    try:
        for module, name, fn in saved:
            setattr(module, name, inspect.unwrap(fn))  # the torch function transformers wrapped
        yield
    finally:
        for module, name, fn in saved:
            setattr(module, name, fn)


def _read_hf_tensors(folder: Path) -> dict[str, torch.Tensor]:
    """model.safetensors, or the shards named by model.safetensors.index.json."""
    from safetensors.torch import load_file

    single, index = folder / "model.safetensors", folder / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            state.update(load_file(str(folder / shard)))
        return state
    raise ExportError(f"no model.safetensors (or index) in {folder}: pass a folder written by save_pretrained")


def import_hf(folder: str | Path) -> HybridLM:
    """Load a Bamba or GraniteMoeHybrid folder into our HybridLM (exact for folders written by `export_hf`)."""
    folder = Path(folder)
    hf = read_hf_config(folder)
    derived = model_config_from_hf(hf)
    ours_path = folder / OUR_CONFIG_NAME
    cfg = ModelConfig.model_validate(json.loads(ours_path.read_text())) if ours_path.is_file() else derived
    if cfg.padded_vocab_size != derived.padded_vocab_size:
        raise ExportError(f"{OUR_CONFIG_NAME} vocab_size {cfg.vocab_size} does not fit config.json's {derived.vocab_size}")
    tensors = _read_hf_tensors(folder)
    if hf.model_type == GRANITE_TYPE:
        tensors = granite_to_bamba_names(tensors)
    state = from_hf_state_dict(tensors, cfg)
    with torch.device("meta"):
        model = HybridLM(cfg)
    try:
        check_state_dict(model, state, str(folder))
    except CheckpointError as exc:
        raise ExportError(str(exc)) from None
    model.load_state_dict(state, strict=True, assign=True)
    model.set_impl()
    return model.eval()
