"""Import of transformers `GraniteMoeHybridForCausalLM` folders (the dense Granite 4.0-H models).

What our model expresses of GraniteMoeHybrid (transformers 5.23, modeling_granitemoehybrid.py):
  - layers: `layer_types` "mamba"/"attention" (read as linear_attention/full_attention): pattern M/A;
    the Mamba2 layer is Bamba's (same tensor names, [z, x, B, C, dt] in_proj, grouped gated RMSNorm);
  - MLP: `shared_mlp` only, i.e. `num_local_experts == 0` (Granite 4.0-H-Micro; the Tiny/Small models
    are MoE and refused). Its `input_linear` (2 * shared_intermediate_size, d) holds [gate; up] and it
    computes act(gate) * up: our SwiGLU with gate_proj / up_proj the two halves;
  - multipliers: embedding_multiplier, residual_multiplier (on every branch before the residual add),
    attention_multiplier (the softmax scale) and logits_scaling (a divisor): model.scales;
  - position_embedding_type "rope" (RoPE over the full head) or anything else (Granite 4.0-H: "nope"):
    no position embedding, model.attention.rope false.
Refused with one line naming it: experts, an activation other than silu, biases, partial or scaled RoPE.
Keys are renamed to Bamba's (`granite_to_bamba_names`), then export/hf.py's Bamba import maps them to ours.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from export import ExportError
from model.config import ATTENTION, MAMBA, ModelConfig

MODEL_TYPE = "granitemoehybrid"

_RENAMES = {  # GraniteMoeHybrid -> Bamba, inside one layer
    "post_attention_layernorm.": "pre_ff_layernorm.",
    "shared_mlp.output_linear.": "feed_forward.down_proj.",
}
_LAYER_KEY = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


def check_importable(hf: Any) -> None:
    """ExportError naming everything of the GraniteMoeHybridConfig `hf` that our model cannot express."""
    problems = []
    if (hf.num_local_experts or 0) > 0:
        problems.append(f"MoE experts (num_local_experts={hf.num_local_experts}; only the dense shared-MLP "
                        "models, e.g. granite-4.0-h-micro, are supported)")
    if hf.hidden_act != "silu":
        problems.append(f"hidden_act {hf.hidden_act} (ours is SwiGLU: silu)")
    for flag in ("attention_bias", "mamba_proj_bias"):
        if getattr(hf, flag):
            problems.append(f"{flag}=true")
    rope = hf.rope_parameters or {}
    if hf.position_embedding_type == "rope":
        if rope.get("rope_type", "default") != "default":
            problems.append(f"rope_type {rope['rope_type']}")
        if float(rope.get("partial_rotary_factor", 1.0)) != 1.0:
            problems.append(f"partial_rotary_factor {rope['partial_rotary_factor']} (ours rotates the full head)")
    kinds = set(hf.layer_types) - {"linear_attention", "full_attention"}
    if kinds:
        problems.append(f"layer types {sorted(kinds)}")
    if problems:
        raise ExportError("this GraniteMoeHybrid checkpoint has no equivalent in our model: " + "; ".join(problems))


def model_config_from_granite(hf: Any) -> ModelConfig:
    """Our ModelConfig of a GraniteMoeHybridConfig (ExportError where ours cannot represent it)."""
    check_importable(hf)
    rope = hf.rope_parameters or {}
    head_dim = getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads  # as Granite reads it
    return ModelConfig(
        vocab_size=hf.vocab_size,
        d_model=hf.hidden_size,
        n_layers=hf.num_hidden_layers,
        pattern="".join(MAMBA if t == "linear_attention" else ATTENTION for t in hf.layer_types),
        ffn_hidden=hf.shared_intermediate_size,
        attention={
            "n_heads": hf.num_attention_heads,
            "n_kv_heads": hf.num_key_value_heads,
            "head_dim": head_dim,
            "rope_theta": rope.get("rope_theta", 10000.0),
            "rope": hf.position_embedding_type == "rope",
        },
        mamba={
            "d_state": hf.mamba_d_state, "headdim": hf.mamba_d_head, "expand": hf.mamba_expand,
            "n_groups": hf.mamba_n_groups, "d_conv": hf.mamba_d_conv, "chunk_size": hf.mamba_chunk_size,
            "conv_bias": hf.mamba_conv_bias, "dt_limit": tuple(hf.time_step_limit or (0.0, math.inf)),
        },
        scales={
            "embedding": hf.embedding_multiplier,
            "residual": hf.residual_multiplier,
            "attention": hf.attention_multiplier,
            "logits_divisor": hf.logits_scaling,
        },
        norm_eps=hf.rms_norm_eps,
        tie_embeddings=hf.tie_word_embeddings,
        max_seq_len=hf.max_position_embeddings,
    )


def granite_to_bamba_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GraniteMoeHybrid's tensors under Bamba's names; the shared MLP's input_linear split into gate and up."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key == "model.norm.weight":
            out["model.final_layernorm.weight"] = tensor
            continue
        m = _LAYER_KEY.match(key)
        rest = m.group(2) if m else ""
        if rest == "shared_mlp.input_linear.weight":
            gate, up = tensor.chunk(2, dim=0)  # act(first half) * second half
            prefix = f"model.layers.{m.group(1)}.feed_forward."
            out[prefix + "gate_proj.weight"], out[prefix + "up_proj.weight"] = gate, up
            continue
        for theirs, bamba in _RENAMES.items():
            if rest.startswith(theirs):
                key = f"model.layers.{m.group(1)}.{bamba}{rest[len(theirs):]}"
                break
        out[key] = tensor
    return out
