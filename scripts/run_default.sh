#!/usr/bin/env bash
# The main job on the embedded default, end to end on CPU (no download):
#   curate the embedded recipe -> pretrain the tiny preset (DeepSpeed, 2 processes)
#   -> evaluate (local lm-eval tasks + validation perplexity) -> export (HF, ONNX) -> generate.
# Re-running resumes: curation skips finished tasks, pretraining continues from its last checkpoint.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
RUN=outputs/tiny_run

echo "== 1/5 curate: data_recipes/embedded.yaml -> outputs/embedded"
python pipeline/curate.py --recipe embedded --output outputs/embedded

echo "== 2/5 pretrain: config/runs/tiny.yaml, DeepSpeed ZeRO-2, 2 CPU processes"
deepspeed --num_gpus 2 launch/pretrain.py --config tiny --resume auto

echo "== 3/5 evaluate: local lm-eval tasks + validation perplexity"
python eval/run.py --checkpoint "$RUN/final" --benchmarks local_mc,local_gen,val_ppl \
    --tasks-dir eval/tasks --manifest outputs/embedded/manifest.json --output "$RUN/eval_results.json"

echo "== 4/5 export: Hugging Face (Bamba) and ONNX"
python launch/export.py --checkpoint "$RUN/final" --format hf,onnx --output "$RUN/exports"

echo "== 5/5 generate"
python launch/generate.py --checkpoint "$RUN/final" --prompt "def read_config(path):" \
    --max-new-tokens 60 --temperature 0.7 --top-p 0.9 --seed 0
