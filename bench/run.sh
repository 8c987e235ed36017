#!/usr/bin/env bash
# The benchmark suite: one command per question of bench/README.md.
#
#   bash bench/run.sh SUITE[:PART] OUT_DIR      # e.g. bash bench/run.sh train:step /tmp/out
#   bash bench/run.sh list                      # every suite and its parts
#
# A suite runs its parts one after another; each PART fits a 10-minute call on one GPU of its kind (the
# `scale` parts need 2, 4 or 8 GPUs). Result files go to OUT_DIR/results/ named <question>_<hardware>_<date>
# (bench/README.md, "Result names"), bundled as OUT_DIR/results.tgz; every command's output to OUT_DIR/log.txt.
# A part goes on after a failed command: each bench writes its rows as it measures them.
#
# GPU suites need the CUDA extras (requirements-cuda.txt: mamba-ssm, causal-conv1d, flash-attn) and, where
# they train on real data, curated shards: DATA=<manifest.json> (default the embedded recipe's,
# outputs/embedded/manifest.json). Run folders of multi-process runs go under WORK (default /dev/shm/scale).
# CHECK_ONLY=1 (any machine; tests/bench): the parts driven by bench/scale_runs.py (checks:determinism, scale:*)
# and bench/fp8_train.py (fp8:*) validate every run config and batch split they would launch and launch
# nothing; the presets:* parts run whatever `deepspeed` is first on PATH.
set -uo pipefail

declare -A PARTS=(
    [train]="step bamba bamba_16k fwd_bwd pretrain"
    [inference]="decode memory"
    [parts]="blocks block_types overhead kernels"
    [data]="curation eval"
    [checks]="parity grad_norm determinism"
    [scale]="x2_1.3b x2_preempt x2_13b x4_1.3b x4_13b x4_preempt x8_1.3b x8_13b x8_preempt"
    [variants]="state_memory"
    [finetune]="lora_vs_full"
    [long_context]="lengths context_parallel"
    [fp8]="1.3b 1.3b_loss 2.7b profile once profile_once"
    [presets]="2.7b 6.7b 13b_reduced"
    [tests]="train other"
    [tutorial]="small"
    [ablation]="patterns variants2"
)
SUITES="train inference parts data checks scale variants finetune long_context fp8 presets tests tutorial ablation"
# The Python packages a suite imports beyond torch (requirements.txt, requirements-cuda.txt), checked before
# any work: on an offline GPU machine a missing wheel is one line at start, not a failure minutes in.
# (Training reads the curated shards through datatrove; curation also needs nltk and py3langid; finetune needs peft;
# fp8 needs torchao.)
kernels="mamba_ssm causal_conv1d flash_attn"
declare -A NEEDS=(
    [train]="$kernels deepspeed datatrove transformers"
    [inference]="$kernels transformers"
    [parts]="$kernels"
    [data]="datatrove nltk py3langid lm_eval transformers"
    [checks]="$kernels deepspeed datatrove"
    [scale]="$kernels deepspeed datatrove"
    [variants]="$kernels"
    [finetune]="$kernels deepspeed peft"
    [long_context]="$kernels"
    [fp8]="$kernels deepspeed datatrove torchao"
    [presets]="$kernels deepspeed datatrove"
    [tests]=""
    [tutorial]="$kernels deepspeed datatrove lm_eval transformers"
    [ablation]="$kernels deepspeed datatrove sentencepiece nltk py3langid"
)

if [ "${1:-}" = list ]; then
    for s in $SUITES; do echo "$s: ${PARTS[$s]}"; done
    exit 0
fi
if [ $# -ne 2 ]; then
    echo "usage: bash bench/run.sh SUITE[:PART] OUT_DIR (bash bench/run.sh list: the suites and parts)" >&2
    exit 2
fi
target=$1 out=$2
suite=${target%%:*}
part=${target#"$suite"}; part=${part#:}
if [ -z "${PARTS[$suite]:-}" ]; then
    echo "unknown suite '$suite': one of $SUITES (bash bench/run.sh list)" >&2
    exit 2
fi
if [ -n "$part" ] && [[ " ${PARTS[$suite]} " != *" $part "* ]]; then
    echo "unknown part '$part' of suite $suite: one of ${PARTS[$suite]}" >&2
    exit 2
fi

if [ -z "${CHECK_ONLY:-}" ] && [ -n "${NEEDS[$suite]}" ]; then
    missing=$(python3 -c 'import importlib.util, sys; print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))' ${NEEDS[$suite]})
    if [ -n "$missing" ]; then
        echo "suite $suite needs $missing: install them (requirements.txt, requirements-cuda.txt) or put their wheels on PYTHONPATH" >&2
        exit 2
    fi
fi
data=${DATA:-outputs/embedded/manifest.json}
res="$out/results"
work=${WORK:-/dev/shm/scale}
mkdir -p "$res"
export PYTHONUNBUFFERED=1
export BENCH_RESULTS="$res"  # bench/common.py's default results folder: scripts without --out write here too
log="$out/log.txt"
today=$(date -u +%F)

step() {  # step SECONDS CMD...: run with a time limit, log it, never stop the part
    local limit=$1; shift
    echo "=== $(date -u +%H:%M:%S) [$limit s] $*" | tee -a "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "=== exit $? at $(date -u +%H:%M:%S)" | tee -a "$log"
}
gpu_tag() {  # h100 / h200 ... (cpu without a GPU): the hardware part of a result name
    command -v nvidia-smi >/dev/null || { echo cpu; return; }
    nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o 'H[0-9]\{3\}' | tr 'H' 'h' || echo gpu
}
name() {  # name QUESTION [HARDWARE]: the result name <question>_<hardware>_<date>
    echo "${1}_${2:-$(gpu_tag)}_$today"
}
stamp() {  # stamp OLD NEW: rename a script's fixed-name result files OUT/results/OLD{.json,.md,...} to NEW
    local ext
    for ext in .json .md .png _per_tensor.json; do
        [ -e "$res/$1$ext" ] && mv "$res/$1$ext" "$res/$2$ext"
    done
}
matmul_peak() {  # bf16 GEMM TFLOP/s of this GPU: the MFU denominator handed to the trainer
    [ -n "${CHECK_ONLY:-}" ] && { echo 1; return; }
    python3 -c "import torch; from bench.common import matmul_peak_tflops as p; print(round(p(torch.device('cuda')), 1))"
}
manifest_vocab() {  # manifest_vocab [MANIFEST]: the curated tokenizer's vocabulary, the model's vocab_size for its shards
    python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['tokenizer']['vocab_size'])" "${1:-$data}"
}
pretrain_run() {  # pretrain_run LIMIT NAME ARGS...: launch/pretrain.py on one GPU, its .md, metrics, host memory
    local limit=$1 name=$2; shift 2
    local run_dir=/tmp/$name cmd=(deepspeed --num_gpus 1 launch/pretrain.py --resume none "$@"
        --set train.output_dir=/tmp/$name --set train.save_every=0 --set train.save_final=false
        --set train.log_every=1 --set train.wandb.mode=disabled)
    ( while sleep 5; do free -b | awk -v t="$(date -u +%H:%M:%S)" '/^Mem:/ {print t, $3}'; done ) >"$res/${name}_host_mem.txt" 2>/dev/null &
    local sampler=$!
    step "$limit" "${cmd[@]}"
    local rc
    rc=$(tail -1 "$log" | grep -o 'exit [0-9]*' | cut -d' ' -f2)
    kill "$sampler" 2>/dev/null
    cp "$run_dir"/metrics.jsonl "$res/${name}_metrics.jsonl" 2>/dev/null
    { echo "# $name: launch/pretrain.py (bench/run.sh $suite:$p), exit $rc"; echo
      echo "Device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); date: $(date -u '+%Y-%m-%d %H:%M UTC'); command:"
      echo; echo "    $(printf '%q ' "${cmd[@]}")"; echo
      echo "Per-step rows: ${name}_metrics.jsonl; host memory used (bytes, every 5 s): ${name}_host_mem.txt."
      echo "Peak host memory used: $(sort -k2 -n "$res/${name}_host_mem.txt" | tail -1 | cut -d' ' -f2) bytes."; } >"$res/$name.md"
    return "${rc:-1}"
}
step_bench() {  # step_bench LIMIT NAME ARGS...: bench/train_step_throughput.py, graphed ZeRO-1 (the fastest setting)
    local limit=$1 name=$2; shift 2
    step "$limit" python3 bench/train_step_throughput.py --preset 1.3b --cuda-graph --graph-only \
        --ds-config ds_configs/zero1.json --name "$name" --out "$res" "$@"
}

run_part() {  # run_part SUITE PART
    local s=$1 p=$2
    case "$s:$p" in
    train:step)  # ours vs the all-attention twin of equal size
        step_bench 560 "$(name train_step_vs_twin_1.3b)" --seq-lens 8192,16384 --models ours,attention ;;
    train:bamba)  # ours vs HF Bamba (eager: it has no graphed step)
        step_bench 540 "$(name train_step_vs_bamba_1.3b)" --seq-lens 8192,4096 --models ours,hf_bamba ;;
    train:bamba_16k)
        step_bench 560 "$(name train_step_vs_bamba_16k_1.3b)" --seq-lens 16384 --models ours,hf_bamba ;;
    train:fwd_bwd)  # forward+backward alone (graphed); document vs continuous packing on curated shards
        step 150 python3 bench/fwd_bwd_throughput.py --preset 1.3b --seq-len 4096 --batches 2 --iters 6 --act-ckpt off \
            --cuda-graph --name "$(name fwd_bwd_1.3b)" --out "$res"
        step 330 python3 bench/packing_throughput.py --manifest "$data" --preset 1.3b --seq-len 8192 --iters 8 \
            --modes continuous,document,continuous_graph,document_graph --name "$(name packing_1.3b)" --out "$res" ;;
    train:pretrain)  # the real launch: graphed ZeRO-1, fused_wgrad, 2 x 4096 x 8 micro-batches, 25 steps
        local peak vocab
        peak=$(matmul_peak) vocab=$(manifest_vocab)
        pretrain_run 420 "$(name pretrain_1.3b)" --config 1.3b --set data.manifest="$data" \
            --set data.weights.planted=0 --set model.vocab_size="$vocab" --set data.packing=continuous \
            --set train.cuda_graph=true --set train.ds_config=ds_configs/zero1.json --set train.grad_fold=fused_wgrad \
            --set train.micro_batch_size=2 \
            --set train.global_batch_tokens=65536 --set train.max_steps=25 --set train.warmup_steps=5 \
            --set train.eval_every=25 --set train.eval_sequences=16 --set train.peak_tflops="$peak" ;;
    inference:decode)  # batch 1: ours (eager and graphed) vs its HF export and the all-attention twin
        step 150 python3 bench/decode_throughput.py --preset small --models ours,ours_graph,hf,attention \
            --results-dir "$res" --out "$(name decode_small)"
        step 200 python3 bench/decode_throughput.py --preset 1.3b --models ours,ours_graph,hf,attention \
            --results-dir "$res" --out "$(name decode_1.3b)" ;;
    inference:memory)  # training and prefill memory vs sequence length; a profile of one decode step
        step 240 python3 bench/memory_scaling.py --preset 1.3b --name "$(name memory_vs_length_1.3b)" --out "$res"
        step 90 python3 bench/profile_step.py --preset 1.3b --decode --batch 1 --seq-len 1024 --sort device \
            --name "$(name profile_decode_1.3b)" --out "$res" ;;
    parts:blocks)  # the GPU's ceilings, then the forward+backward time of every block part (the planner's input)
        step 60 python3 bench/hw_ceilings.py --out "$res"
        stamp hw_ceilings "$(name hw_ceilings)"
        step 300 python3 bench/block_costs.py --preset 1.3b --seq-lens 4096,8192 --tokens 8192 --chunks 128,256 \
            --profile --name "$(name block_costs_1.3b)" --out "$res" ;;
    parts:block_types)
        step 480 python3 bench/block_types.py --preset small --seq-len 4096 --batch 4 --name "$(name block_types_small)" \
            --out "$res" ;;
    parts:overhead)  # what DeepSpeed's step adds to forward+backward: ZeRO-1 (fused_wgrad), ZeRO-2 (the planner's input)
        step 200 python3 bench/step_overhead.py --preset 1.3b --seq-len 8192 --variants "zero1,zero1 copy_free_fold" \
            --name "$(name step_overhead_zero1_1.3b)" --out "$res"
        step 200 python3 bench/step_overhead.py --preset 1.3b --seq-len 8192 --variants "zero2,zero1 deepspeed_fold" \
            --name "$(name step_overhead_zero2_1.3b)" --out "$res" ;;
    parts:kernels)  # every GPU kernel of one graphed forward+backward, ours and the twin, 1 x 8192
        step 260 python3 bench/profile_step.py --preset 1.3b --seq-len 8192 --batch 1 --kernels --cuda-graph --top 80 \
            --name "$(name profile_step_kernels_8192_1.3b)" --out "$res"
        step 150 python3 bench/profile_step.py --preset 1.3b --twin --seq-len 8192 --batch 1 --kernels --cuda-graph \
            --top 80 --name "$(name profile_step_kernels_8192_twin_1.3b)" --out "$res" ;;
    data:curation)  # CPU: curation stages and tokenization of the embedded recipe
        step 200 python3 bench/curation_throughput.py
        stamp curation_throughput "$(name curation_throughput_embedded cpu)"
        step 380 python3 bench/tokenize_throughput.py
        stamp tokenize_throughput "$(name tokenize_throughput cpu)" ;;
    data:eval)  # the lm-eval backend: ours eager / through CUDA graphs vs lm-eval's hf backend (speed in bf16;
        # scores and texts against the hf backend in float32, where kernel rounding does not hide a difference)
        step 300 python3 bench/eval_throughput.py --preset small --backends hybrid,hybrid_graph,hf \
            --out "$(name eval_throughput_small)"
        step 200 python3 bench/eval_throughput.py --preset small --backends hybrid,hf --dtype float32 --docs 100 \
            --out "$(name eval_parity_small_fp32)" ;;
    checks:parity)  # the kernel path vs the reference path, same weights (small; per tensor)
        step 200 python3 bench/kernel_parity.py --presets small --seq-len 1024 --batch 2 \
            --cases "float32,bf16,float32 packed,bf16 packed" --out "$res"
        stamp kernel_parity "$(name kernel_parity_small)" ;;
    checks:grad_norm)  # the engine's gradient norm (ZeRO-1/2, eager/graphed) vs a float32 reference
        step 400 python3 bench/grad_norm_check.py --preset small --name "$(name grad_norm_check_small)" --out "$res" ;;
    checks:determinism)  # exact resume: SIGTERM, --resume auto; default kernels vs train.deterministic=true
        local peak vocab common
        peak=$(matmul_peak) vocab=$(manifest_vocab)
        common=(--config 1.3b --set model.preset=small --set data.manifest="$data" --set data.weights.planted=0
                --set model.vocab_size="$vocab" --set train.micro_batch_size=4 --set train.global_batch_tokens=65536
                --set train.peak_tflops="$peak" --set train.log_every=1 --set train.eval_every=0
                --set train.wandb.mode=disabled --gpus 1 --steps 12 --signal-after 5
                --work "$work" --out "$res" ${CHECK_ONLY:+--check})
        export TRITON_CACHE_AUTOTUNING=1  # each of the 6 launches would otherwise autotune mamba_ssm afresh
        step 290 python3 bench/scale_runs.py preempt "${common[@]}" --name "$(name determinism_default_small)"
        step 300 python3 bench/scale_runs.py preempt "${common[@]}" --set train.deterministic=true \
            --name "$(name determinism_deterministic_small)" ;;
    scale:*)  # bench/scale_runs.py: the real launch command on 2 / 4 / 8 GPUs (the part's prefix), summarised
        local peak vocab common small big
        peak=$(matmul_peak) vocab=$(manifest_vocab)
        common=(--set data.manifest="$data" --set data.weights.planted=0 --set model.vocab_size="$vocab"
                --set train.peak_tflops="$peak" --set train.log_every=1 --set train.eval_every=0
                --set train.wandb.mode=disabled --work "$work" --out "$res" ${CHECK_ONLY:+--check})
        # global batches cut from the presets' 2M / 4M tokens so that the steps fit a 10-minute call
        small=(--config 1.3b --set train.global_batch_tokens=262144)   # 4 x 4096 micro-batches
        big=(--config 13b --set train.global_batch_tokens=65536)       # 1 x 4096 micro-batches: ZeRO-3
        local n=${p%%_*}
        case "$p" in
        x2_1.3b|x4_1.3b)  # scaling: the same global batch on 1, 2 (, 4) GPUs
            local gpus=1,2; [ "$n" = x4 ] && gpus=1,2,4
            step 540 python3 bench/scale_runs.py scaling "${small[@]}" --gpus $gpus --steps 30 \
                --name "$(name scale_1.3b "$n")" "${common[@]}" ;;
        x2_13b|x4_13b)
            step 540 python3 bench/scale_runs.py scaling "${big[@]}" --gpus "${n#x}" --steps 20 \
                --name "$(name scale_13b_zero3 "$n")" "${common[@]}" ;;
        x2_preempt|x4_preempt|x8_preempt)  # SIGTERM after 8 steps, --resume auto on as many GPUs and on half
            local resume=(--resume-gpus $(( ${n#x} / 2 ))); [ "$n" = x8 ] && resume=()
            step 420 python3 bench/scale_runs.py preempt "${small[@]}" --gpus "${n#x}" "${resume[@]}" --steps 20 \
                --signal-after 8 --name "$(name preempt_1.3b "$n")" "${common[@]}" ;;
        x8_1.3b|x8_13b)  # the README's command (config 1.3b, then 13b) through the driver, which adds only the --set above
            local cfg=("${small[@]}"); [ "$p" = x8_13b ] && cfg=("${big[@]}")
            step 540 python3 bench/scale_runs.py scaling "${cfg[@]}" --gpus 8 --steps 30 \
                --name "$(name "readme_${p#x8_}" x8)" "${common[@]}" ;;
        esac ;;
    variants:state_memory)  # the hybrid variants: training tokens/s and memory, decode state and tokens/s
        step 420 python3 bench/state_memory.py --preset small --contexts 1024,8192,32768 --iters 5 --new-tokens 32 \
            --rounds 3 --name "$(name state_memory_small)" --out "$res" ;;
    finetune:lora_vs_full)
        step 400 python3 bench/finetune_lora_vs_full.py --preset 1.3b --tokenizer "$(dirname "$data")/tokenizer" \
            --name "$(name finetune_lora_vs_full_1.3b)" --out "$res" ;;
    long_context:lengths)  # 32K-128K tokens per sequence, the first activation-checkpointing mode that fits
        step 360 python3 bench/long_context.py --preset 1.3b --name "$(name long_context_1.3b)" --out "$res" ;;
    long_context:context_parallel)  # context parallelism's overhead on one rank
        step 300 python3 bench/context_parallel_overhead.py --preset small --seq-len 8192 --batch 2 --docs 4 \
            --name "$(name context_parallel_overhead_small)" --out "$res" ;;
    fp8:1.3b|fp8:1.3b_loss|fp8:2.7b)  # launch/pretrain.py in bf16 vs float8 (bench/fp8_train.py); VARIANTS: other
        # variants of bench/fp8_train.py than bf16,fp8 (e.g. bf16,fp8_once_step; they name the result files)
        local peak vocab common variants=${VARIANTS:-bf16,fp8} tag=${VARIANTS:+_${VARIANTS//,/_}}
        peak=$(matmul_peak) vocab=$(manifest_vocab)
        common=(--set data.manifest="$data" --set data.weights.planted=0 --set model.vocab_size="$vocab"
                --set train.peak_tflops="$peak" --set train.seq_len=4096 --work /tmp --out "$res" ${CHECK_ONLY:+--check})
        if [ "$p" = 1.3b ]; then  # throughput at the pretraining settings: 2 x 4096 x 8 micro-batches per step
            # rowwise's throughput too: --variants bf16,fp8,fp8_rowwise (about 100 s more)
            step 400 python3 bench/fp8_train.py --config 1.3b --variants "$variants" --steps 30 \
                --set train.micro_batch_size=2 --set train.global_batch_tokens=65536 \
                --name "$(name fp8_train_1.3b_accum8$tag)" "${common[@]}"
        elif [ "$p" = 1.3b_loss ]; then  # loss parity: 300 optimizer steps of one micro-batch (2 x 4096) each
            step 560 python3 bench/fp8_train.py --config 1.3b --variants "$variants" --steps 300 \
                --set train.micro_batch_size=2 --set train.global_batch_tokens=8192 --name "$(name fp8_train_1.3b$tag)" \
                "${common[@]}"
        else
            step 500 python3 bench/fp8_train.py --config 2.7b --variants "$variants" --steps 20 \
                --set train.micro_batch_size=1 --set train.global_batch_tokens=16384 --name "$(name fp8_train_2.7b$tag)" \
                "${common[@]}"
        fi ;;
    fp8:once)  # train.fp8.casts=once (train/fp8_linear.py), weights cast per call and per step, beside bf16, at
        # fp8:1.3b's settings (torchao's casts at these settings: fp8:1.3b)
        local peak vocab
        peak=$(matmul_peak) vocab=$(manifest_vocab)
        step 560 python3 bench/fp8_train.py --config 1.3b --variants bf16,fp8_once,fp8_once_step --steps 30 \
            --set train.micro_batch_size=2 --set train.global_batch_tokens=65536 \
            --set data.manifest="$data" --set data.weights.planted=0 --set model.vocab_size="$vocab" \
            --set train.peak_tflops="$peak" --set train.seq_len=4096 --work /tmp --out "$res" ${CHECK_ONLY:+--check} \
            --name "$(name fp8_train_1.3b_once)" ;;
    fp8:profile_once)  # every GPU kernel of the cast-once float8 step (group against fp8:profile's, profile_compare.py)
        step 260 python3 bench/profile_step.py --preset 1.3b --seq-len 4096 --batch 2 --kernels --cuda-graph --top 80 \
            --fp8 tensorwise --fp8-casts once --fp8-weight-casts step \
            --name "$(name profile_step_kernels_4096_fp8_once_1.3b)" --out "$res" ;;
    fp8:profile)  # every GPU kernel of one graphed 1.3B forward+backward, 2 x 4096, bf16 and float8
        step 200 python3 bench/profile_step.py --preset 1.3b --seq-len 4096 --batch 2 --kernels --cuda-graph --top 80 \
            --name "$(name profile_step_kernels_4096_bf16_1.3b)" --out "$res"
        step 260 python3 bench/profile_step.py --preset 1.3b --seq-len 4096 --batch 2 --kernels --cuda-graph --top 80 \
            --fp8 tensorwise --name "$(name profile_step_kernels_4096_fp8_1.3b)" --out "$res" ;;
    presets:*)  # the larger presets on one GPU (the runs python -m train.plan --check reads)
        local peak vocab data_sets graph big
        peak=$(matmul_peak) vocab=$(manifest_vocab)
        data_sets=(--set data.manifest="$data" --set data.weights.planted=0 --set model.vocab_size="$vocab"
                   --set data.packing=continuous --set train.seq_len=4096 --set train.warmup_steps=2
                   --set train.eval_every=0 --set train.peak_tflops="$peak" --set train.activation_checkpointing=false)
        case "$p" in
        2.7b)  # graphed ZeRO-1 (fused_wgrad); micro-batch 2, or 1 when the planner check (or the GPU) refuses 2
            graph=(--config 2.7b "${data_sets[@]}" --set train.cuda_graph=true --set train.ds_config=ds_configs/zero1.json
                   --set train.grad_fold=fused_wgrad --set train.global_batch_tokens=65536 --set train.max_steps=20)
            pretrain_run 330 "$(name pretrain_2.7b)" "${graph[@]}" --set train.micro_batch_size=2 ||
                pretrain_run 150 "$(name pretrain_2.7b_mb1)" "${graph[@]}" --set train.micro_batch_size=1 ;;
        6.7b)  # one H200 (needs_h200): ZeRO-1 without offload, micro-batch 1 (the planner: 127 of 140 GiB), or with the
            # MLPs recomputed when that runs out of memory. Offloading the optimizer needs ~133 GiB of host memory
            # (24 B/param), more than the lent machines' 125 GiB: results/pretrain_6.7b_offload_h100_2026-12-07
            big=(--config 6.7b "${data_sets[@]}" --set train.ds_config=ds_configs/zero1.json
                 --set train.micro_batch_size=1 --set train.global_batch_tokens=32768 --set train.max_steps=10)
            pretrain_run 330 "$(name pretrain_6.7b)" "${big[@]}" ||
                pretrain_run 230 "$(name pretrain_6.7b_mlp)" "${big[@]}" --set train.activation_checkpointing=mlp ;;
        13b_reduced)  # the 13B widths at 16 layers: ZeRO-3 + optimizer offload (per-layer cost and memory; the
            # planner: 25 GiB of GPU, 99 GiB of host of the lent machines' 125)
            pretrain_run 470 "$(name pretrain_13b_reduced)" --config 13b "${data_sets[@]}" --set model.n_layers=16 \
                --set train.ds_config=ds_configs/zero3_offload.json --set train.micro_batch_size=1 \
                --set train.global_batch_tokens=32768 --set train.max_steps=10 ;;
        esac ;;
    tutorial:small)  # docs/tutorial.md's one-GPU path, its commands as written; their console output in one file
        local run=outputs/small_run tlog
        tlog="$res/$(name tutorial_small)_log.txt"
        if [ -e "$run" ]; then
            echo "$run exists: the tutorial starts from nothing (move it away)" | tee -a "$log"
            return 2
        fi
        tstep() {  # tstep LIMIT CMD...: step, then the command line and its output appended to tlog
            local before
            before=$(wc -l <"$log")
            step "$@"
            { shift; echo "\$ $*"; tail -n +"$((before + 2))" "$log" | sed '$d'; } >>"$tlog"
        }
        tstep 330 deepspeed --num_gpus 1 launch/pretrain.py --config small --resume auto --set data.manifest="$data" \
            --set model.vocab_size="$(manifest_vocab)" --set train.max_steps=100 --set train.eval_every=25 --set train.wandb.mode=disabled
        tstep 30 python3 -m train.plot "$run"
        tstep 120 python3 eval/run.py --checkpoint "$run/final" --benchmarks local_mc,local_gen,val_ppl \
            --tasks-dir eval/tasks --manifest "$data" --output "$run/eval_results.json"
        tstep 60 python3 launch/export.py --checkpoint "$run/final" --format hf --output "$run/exports"
        tstep 45 python3 launch/generate.py --checkpoint "$run/final" --prompt "def read_config(path):" \
            --max-new-tokens 60 --temperature 0.7 --top-p 0.9 --seed 0
        cp "$run/loss.png" "$res/$(name tutorial_small_loss).png"
        cp "$run/metrics.jsonl" "$res/$(name tutorial_small)_metrics.jsonl"
        cp "$run/eval_results.json" "$res/$(name tutorial_small)_eval.json" ;;
    ablation:*)  # launch/ablate.py at 125M scale on the python_packages corpus (docs/experiments.md). The first
        # call curates the corpus into ABLATION_DIR (default /tmp/ablation: minutes on 2 CPU cores, results/
        # curation_python_packages_cpu_*, so about one on a 16-core GPU machine) and trains in the rest of its
        # 570 s; every call trains until its limit and stops with a checkpoint, and the next call of the part
        # continues: run it again until the report has no "(unfinished)" row. Run folders stay on the machine;
        # ONLY=NAME[,NAME] trains some variants here and leaves the others to another machine (the runs' files come
        # back in runs.tgz). CONFIG: the run config (default small), TOKENS (default 50M) and SEEDS (default 1) per run;
        # LIMIT: the part's seconds (default 570; less when the call also installs wheels first).
        local dir=${ABLATION_DIR:-/tmp/ablation} corpus vocab folder limit=${LIMIT:-570} started=$SECONDS
        corpus=$dir/python_packages
        if [ ! -f "$corpus/manifest.json" ]; then
            step 540 python3 pipeline/curate.py --recipe python_packages --output "$corpus"
            cp "$corpus/report.json" "$res/$(name ablation_corpus_python_packages).json" 2>/dev/null
            limit=$((limit - (SECONDS - started)))
            [ -f "$corpus/manifest.json" ] && [ "$limit" -ge 120 ] || return 0
        fi
        vocab=$(manifest_vocab "$corpus/manifest.json")
        step "$limit" python3 launch/ablate.py --config "${CONFIG:-small}" --variants "config/ablations/$p.yaml" \
            --tokens "${TOKENS:-50000000}" --seeds "${SEEDS:-1}" --output "$dir/$p" ${ONLY:+--only "$ONLY"} \
            --set data.manifest="$corpus/manifest.json" --set model.vocab_size="$vocab" \
            --set train.peak_tflops="$(matmul_peak)" --set train.wandb.mode=disabled
        [ -f "$dir/$p/report.md" ] || return 1  # refused before any run: the log says why
        folder="$res/$(name "ablation_${p}_${CONFIG:-small}")"
        mkdir -p "$folder"
        cp "$dir/$p"/report.md "$dir/$p"/report.json "$dir/$p"/*.png "$folder/"
        # what the report is made of, small enough to bring back: another machine's runs (ONLY=...) merge with
        # these under one folder into one report (launch/ablate.py --report-only, docs/experiments.md)
        (cd "$dir/$p" && find . \( -name metrics.jsonl -o -path '*/final/meta.json' -o -path '*/final/eval_results.json' \) \
            -print0 | tar --null -czf "$folder/runs.tgz" -T -) ;;
    tests:*)  # the test suite on the GPU machine in two parts, one device call each (the whole ran past 575 s on
        # an H100 with 14 workers): train = tests/train + tests/adapt (most launch CPU DeepSpeed worlds), other =
        # the rest. WHEELS: a folder of wheels to install first.
        local targets=(tests/train tests/adapt)
        [ "$p" = other ] && targets=(tests --ignore=tests/train --ignore=tests/adapt)
        mkdir -p "${WHEELS:-/tmp/no_wheels}"
        WORKERS=${WORKERS:-14} SESSION_TIMEOUT=${SESSION_TIMEOUT:-480} step 580 bash scripts/test_gpu.sh \
            "${WHEELS:-/tmp/no_wheels}" "$res/$(name "test_suite_gpu_$p")" "${targets[@]}" ;;
    esac
}

for p in ${part:-${PARTS[$suite]}}; do
    echo "--- $suite:$p" >>"$log"
    run_part "$suite" "$p"
done
tar -czf "$out/results.tgz" -C "$out" results
