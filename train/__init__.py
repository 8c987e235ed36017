"""Pretraining on DeepSpeed: data from the curated manifest, the engine, checkpoints, metrics.

Entry point: `launch/pretrain.py` (see docs/pretraining.md). Modules, one job each:

    data         blended, document-aware sequences from the manifest (config.manifest reads it);
                 the world-size-independent sample order
    optim        AdamW parameter groups and the learning-rate schedules
    ds_config    the DeepSpeed config: a ds_configs/ JSON completed from the run config
    checkpoint   atomic step checkpoints, resume (also on another world size), rotation
    consolidate  one fp32 safetensors folder from a live engine or a saved checkpoint
    metrics      console, metrics.jsonl and wandb; tokens/s, MFU, memory, ETA
    distributed  process-group set-up, preemption signals, failing loudly on every rank
    provenance   git commit and package versions stored with checkpoints and exports
    errors       the one-line error type and the tuple of bad-input errors
    trainer      the loop that ties them together
"""
