"""The hybrid wrapper of a pretrained transformer (the design's adaptive-hybrid-ssm).

A local Hugging Face decoder-only transformer (Llama, Qwen2/3, Gemma families) is frozen; each of its top
`adapt.layers` decoder layers gains, beside its attention, a Mamba2 path (model/mamba2.py's mixer), a
per-channel gate that starts at zero (the wrapped model equals the base at step 0) and an optional
learned memory bank. Only the added parameters train, and only they are saved.

    adapt.wrapper   AdaptedLM: wrap, forward, prefill/step decoding, save/load of the added weights
    adapt.data      token windows from a manifest or a .jsonl of {"text"} records
    adapt.training  AdaptTrainer: the pretraining Trainer and its DeepSpeed engine over the added parameters

Entry point: `python launch/adapt.py` (docs/adapt.md).
"""
