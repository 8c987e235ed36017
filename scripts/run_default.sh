#!/usr/bin/env bash
# The main job on the embedded default, end to end on CPU (no download):
#   curate the embedded recipe -> pretrain the tiny preset (DeepSpeed, 2 processes)
#   -> evaluate (local lm-eval tasks + validation perplexity) -> export (HF, ONNX) -> generate,
# then a summary of what it made. Re-running resumes: curation skips finished tasks, pretraining
# continues from its last checkpoint.
#
#   bash scripts/run_default.sh             # one line per stage; each stage's output in outputs/logs/N-stage.log
#                                           # (curation's per-task logs: outputs/embedded/work/logs/)
#   bash scripts/run_default.sh --verbose   # the stages with --verbose (libraries' notices, datatrove's
#                                           # per-task lines, every rank's warnings), on the console too
set -euo pipefail
cd "$(dirname "$0")/.."
VERBOSE=0
V=()  # the stages' own --verbose
case "${1:-}" in
  "") ;;
  -v|--verbose) VERBOSE=1; V=(--verbose) ;;
  *) echo "usage: bash scripts/run_default.sh [--verbose]" >&2; exit 2 ;;
esac
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
DATA=outputs/embedded
RUN=outputs/tiny_run
LOGS=outputs/logs
mkdir -p "$LOGS"

# stage N NAME WHAT CMD...: one line on the console (with the time taken), the full output in
# $LOGS/N-NAME.log; a failing stage shows the end of its log and stops the job with its exit code.
stage() {
  local n=$1 name=$2 what=$3 log="$LOGS/$1-$2.log" start=$SECONDS rc=0
  shift 3
  if [ "$VERBOSE" = 1 ]; then
    echo "== $n/5 $name: $what"
    "$@" 2>&1 | tee "$log" || rc=${PIPESTATUS[0]}
  else
    printf '%s/5 %-9s %s ... ' "$n" "$name" "$what"
    "$@" >"$log" 2>&1 || rc=$?
  fi
  if [ "$rc" != 0 ]; then
    [ "$VERBOSE" = 1 ] || { echo "failed (exit $rc); the end of $log:"; tail -n 15 "$log"; }
    exit "$rc"
  fi
  [ "$VERBOSE" = 1 ] || echo "done in $((SECONDS - start)) s"
}

stage 1 curate "data_recipes/embedded.yaml -> $DATA" \
  python pipeline/curate.py --recipe embedded --output "$DATA" ${V[@]+"${V[@]}"}
stage 2 pretrain "config/runs/tiny.yaml, DeepSpeed ZeRO-2, 2 CPU processes -> $RUN" \
  deepspeed --num_gpus 2 launch/pretrain.py --config tiny --resume auto ${V[@]+"${V[@]}"}
stage 3 evaluate "local lm-eval tasks + validation perplexity" \
  python eval/run.py --checkpoint "$RUN/final" --benchmarks local_mc,local_gen,val_ppl \
    --tasks-dir eval/tasks --manifest "$DATA/manifest.json" --output "$RUN/eval_results.json" \
    ${V[@]+"${V[@]}"}
stage 4 export "Hugging Face (Bamba) and ONNX -> $RUN/exports" \
  python launch/export.py --checkpoint "$RUN/final" --format hf,onnx --output "$RUN/exports" ${V[@]+"${V[@]}"}
PROMPT="def read_config(path):"
stage 5 generate "a sample from the checkpoint -> $RUN/sample.txt" \
  sh -c 'python launch/generate.py "$@" > "$0"' "$RUN/sample.txt" --checkpoint "$RUN/final" \
    --prompt "$PROMPT" --max-new-tokens 60 --temperature 0.7 --top-p 0.9 --seed 0

echo
echo "sample:"
{ printf '%s' "$PROMPT"; cat "$RUN/sample.txt"; } | sed 's/^/    /'
echo
python launch/summary.py --data "$DATA" --run "$RUN" --logs "$LOGS"
