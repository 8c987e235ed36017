#!/usr/bin/env bash
# The exact commands behind the single-GPU results in bench/results/ (*_h100.*), one stage per
# device call (each stage fits in a 10-minute call on one H100).
#
#   bash bench/gpu_runs.sh STAGE OUT_DIR
#
# Needs the CUDA extras importable (requirements-cuda.txt: mamba-ssm, causal-conv1d, flash-attn,
# deepspeed) and, for `train` and `inference`, curated shards: DATA=<manifest.json> (default the
# embedded recipe's, outputs/embedded/manifest.json). Every command's output goes to OUT_DIR/log.txt;
# result files to OUT_DIR/results/ (bundled as OUT_DIR/results.tgz at the end). A stage goes on after
# a failed command: each bench writes its rows as it measures them.
#
# Stages:
#   core       hardware ceilings; document vs continuous packing (1.3B, 8192); forward+backward
#              throughput (1.3B, 4096); a profile of one 1.3B step
#   train      launch/pretrain.py: 1.3B, ZeRO-2, 30 optimizer steps on the curated shards (the
#              embedded recipe's 2K-token `planted` source cannot fill a 4096 window: weight 0);
#              evaluation backend throughput vs lm-eval's hf backend; kernel vs reference parity
#              (small preset, packed, per tensor)
#   peers      full training step (DeepSpeed ZeRO-2) of ours vs HF Bamba, all-attention, HF Llama
#   graph      forward+backward eager vs CUDA-graph replay (1.3B, 4096, with the graphed step's loss and
#              gradient error vs eager); a host-time profile of one 1.3B step
#   parts      forward+backward GPU time of each block part and variant (bench/block_costs.py, with the
#              Mamba2 mixer's top kernels)
#   overhead   the LM head + loss, float32 vs fused cross-entropy (time and error); what the ZeRO step
#              costs per micro-batch beyond forward+backward, by ZeRO setting (bench/step_overhead.py)
#   overhead2  the same split for more settings (overflow check, accumulation dtype) and ZeRO-1's
#   grad_norm  the engine's gradient norm (ZeRO-1/2, eager/graphed, overlap_comm on/off) vs a float32 reference
#              (ZeRO-1 with DeepSpeed's fold); grad_norm_fused_wgrad: the same with train.grad_fold's fused_wgrad
#   peers_fused_ce  the graphed ZeRO-2 step of ours and the twin (fused cross-entropy) vs HF Bamba
#   peers_saved  peers_fused_ce again after the Mamba2 backward kept its forward's intermediates (model/ssd_saved.py)
#   peers_zero1  the same on ds_configs/zero1.json
#   peers_zero1_16k  ours and the all-attention twin, graphed, ZeRO-1, at 16384 tokens
#   docs_graph document vs continuous packing, eager and as CUDA graphs (1.3B, 8192); the graphed
#              fwd_bwd row with the fused MLP; kernel vs reference parity
#   peers_graph  the `peers` step comparison with CUDA-graph rows of ours and the all-attention twin
#   peers_16k  the same at 16384 tokens (ours, all-attention twin, HF Bamba; eager and graphed)
#   eval_graph lm-eval throughput with generate_until through CUDA graphs (hybrid_graph) vs eager and hf
#   train_graph  launch/pretrain.py as `train`, micro-batch 2, continuous packing, train.cuda_graph=true
#   train_docs_graph  the same with document packing (graphs over fixed-capacity document boundaries)
#   train_zero1_graph  `train_graph` on ds_configs/zero1.json, then the ZeRO-1 vs ZeRO-2 step cost split
#   train_zero1_fold_graph  `train_graph` on ds_configs/zero1.json with the copy-free gradient fold (train/grad_fold.py)
#   train_zero1_fused_wgrad_graph  the same with the linear layers' weight gradients added into ZeRO-1's float32
#              buffers by their GEMMs (train.grad_fold=fused_wgrad, model/wgrad.py), then the step cost split
#              fused_wgrad vs copy_free (bench/step_overhead.py)
#   train_zero1_cb_grad_graph  the same (fused_wgrad) with model/ssd_cb_grad.py in the Mamba2 backward
#   mixer      the Mamba2 mixer's backward with the forward's intermediates kept (model/ssd_saved.py) vs
#              mamba_ssm's recomputing function (every part at 8192; the committed run also timed a
#              gated-norm backward launcher with 2-8 programs per SM, since dropped: no gain); the
#              graphed ZeRO-1 step of ours and the all-attention twin with it
#   fold       ZeRO-1's copy-free gradient fold vs DeepSpeed's (bench/step_overhead.py); every part at 16,384 tokens
#   profile8k  every GPU kernel of one eager 1.3B forward+backward at 1 x 8192 (to set against the parts' sum)
#   gaps       the all-attention twin's kernels at 1 x 8192 (as profile8k), and the graphed forward+backward of
#              ours and the twin at 1 x 8192: GPU busy time vs replay time
#   graph_gaps the same kernels replayed from the training graphs (ours, twin): the GPU's idle time between them
#   engine_gaps  one graphed ZeRO-1 micro-batch that steps and one that does not, profiled: the GPU's busy and
#              idle time under the engine (bench/step_overhead.py --profile)
#   peers_fused_wgrad  the step bench on ZeRO-1 (graphed, ours and the all-attention twin) at 8192, 4096, 16384
#              with train.grad_fold's default, fused_wgrad; fused_wgrad_ab: ours alone at 8192 and 4096 with
#              copy_free, then fused_wgrad, on one machine
#   peers_bamba_16k  ours (graphed, fused_wgrad) and HF Bamba (eager) on ZeRO-1 at 16384 tokens
#   peers_fold the step bench on ZeRO-1 (graphed, ours and the all-attention twin) at 8192, 4096, 16384 with it;
#              peers_fold_bamba: ours and HF Bamba (eager: it has no graphed step) at 8192, 4096
#   tiles      mamba_ssm's SSD kernels autotuned over wider tile-config lists than its own (the 5 slowest
#              in the 1.3B mixer at 8192), and the mixer's time with them (bench/ssd_tiles.py)
#   ssd_backends  the SSD scan alone, forward and forward+backward: mamba_ssm's chunked SSD vs fla's chunked
#              simple GLA (chunks 64, 128), errors against a float64 reference (bench/ssd_backends.py)
#   wgrad      each weight gradient into its float32 accumulator: bf16 GEMM + fold vs one GEMM adding into it
#              (bench/wgrad_accumulate.py, 1.3B at 8192 tokens); mamba_ssm's SSD at chunks 64, 128, 256
#   cb_grad    model/ssd_cb_grad.py's one kernel for the SSD backward's C.B and intra-chunk decay gradients vs
#              mamba_ssm's two, alone (bench/ssd_cb_grad.py, tile configs, errors vs float64) and in the Mamba2
#              mixer (8192, 16384; and mamba_ssm's recomputing function; gradient errors vs float64; profile). peers_cb_grad: the step bench (ZeRO-1, graphed, ours and the twin) with it;
#              cb_grad_ab: ours alone with mamba_ssm's two kernels, then with ours, then mamba_ssm's again, one machine.
#              NAME=... renames peers_cb_grad's results (session 11: train_step_throughput_graph_session11_zero1_1.3b_h100)
#   mixer_kernels  every kernel of the Mamba2 mixer's forward+backward (1.3B, 8192 and 16384; bench/block_costs.py)
#   docs_single  document vs continuous packing (as docs_graph) once packed micro-batches of one document per row
#              replay the training graphs' plain step with their positions (no boundaries); RUN=runN names the run.
#              train_zero1_docs_graph: `train_zero1_cb_grad_graph` with document packing
#   determinism  exact resume on one GPU (bench/scale_runs.py preempt: SIGTERM, resume, loss difference to
#              the uninterrupted run), small preset, default kernels vs train.deterministic=true (and
#              the tokens/s each costs); determinism_on: the train.deterministic=true run alone
#   inference  decode throughput (small, 1.3B) vs HF export and all-attention; memory vs sequence
#              length; profiles of one 1.3B decode step (host and device time)
#   block_types  the block types (model/mixers): each mixer's kernel path vs float64, and the small preset's
#              forward+backward speed and memory with its attention blocks as A, R and G (bench/block_types.py)
#   train_zero1_registry_graph  `train_zero1_cb_grad_graph` after the block-type registry and train/graph_step.py
#   preset_2.7b_h100  2.7B on one H100: graphed ZeRO-1 (fused_wgrad) at micro-batch 2 x 4096, or micro-batch 1 when
#              the launch's planner check (or the GPU) refuses 2; 20 steps
#   preset_6.7b_h200  6.7B on one H200: ZeRO-2 with the optimizer in CPU memory (ds_configs/zero2_offload.json), 10 steps
#   preset_13b_reduced_h200  the 13B preset's widths at 18 layers on one H200: ZeRO-3 + optimizer offload, 10 steps
#              (per-layer cost and memory for python -m train.plan). The preset_* stages write
#              pretrain_<name>_<gpu>.md (device, date, the command) + _metrics.jsonl + _host_mem.txt (host memory
#              used, sampled every 5 s), the files `python -m train.plan --check` reads
#   variants2  the hybrid variants of part 2 (H blocks, bridges, state compression 2/4) vs the strategic hybrid,
#              small preset: training tokens/s and memory at 4 x 4096, decode state and tokens/s at 1K-32K
#              (bench/state_memory.py)
#   finetune   LoRA vs full fine-tuning of the 1.3B (launch/finetune.py, ZeRO-2, 4 x 2048): tokens/s, peak memory,
#              trainable parameters (bench/finetune_lora_vs_full.py, with the curated run's tokenizer)
#   long_context  the 1.3B and its all-attention twin at 32K, 64K, 128K tokens per sequence, the first
#              activation-checkpointing mode that fits (bench/long_context.py); context parallelism's overhead
#              on one rank (bench/context_parallel_overhead.py, small preset, 2 x 8192, 4 documents per row)
#   fp8        launch/pretrain.py, 1.3B at 4096 (graphed ZeRO-1, fused_wgrad, micro-batch 2 x 4096, no accumulation):
#              bf16 then float8 tensorwise, 300 optimizer steps each on the curated shards (tokens/s, peak memory,
#              smoothed loss, both curves in one PNG) (bench/fp8_train.py; `--variants bf16,fp8,fp8_rowwise:30` adds
#              rowwise's throughput); fp8_2.7b: the 2.7B at 4096 (micro-batch 1, 4 accumulation), 20 steps each;
#              the two stages fit one 10-minute call
# Multi-GPU stages (bench/scale_runs.py: the real launch command, summarised; run folders in /dev/shm):
#   x2         1.3B ZeRO-2 on 1 and 2 GPUs (scaling); SIGTERM + resume on 2 and, universal, on 1 (default
#              kernels, then train.deterministic=true); 13B ZeRO-3 with activation checkpointing on 2 GPUs
#   x4         1.3B ZeRO-2 on 1, 2 and 4 GPUs; 13B ZeRO-3 and ZeRO-3 + CPU offload on 4; 4 -> 2 resume
#   x8         the README's command, `deepspeed --num_gpus=8 launch/pretrain.py --config 1.3b` then
#              `--config 13b`, on the curated shards; SIGTERM + --resume auto on 8
# The global batch is cut from the presets' 2M/4M tokens so that 30 steps fit a 10-minute call; it
# still takes several micro-batches per optimizer step.
# CHECK_ONLY=1 (any machine, tests/bench): the stages driven by bench/scale_runs.py (determinism, x2, x4,
# x8) and bench/fp8_train.py (fp8, fp8_2.7b) validate every run config and batch split they would launch,
# and launch nothing.
set -uo pipefail
stages="core|train|peers|graph|parts|overhead|overhead2|grad_norm|grad_norm_fused_wgrad|peers_fused_ce|peers_saved|peers_zero1|peers_zero1_16k|docs_graph|peers_graph|peers_16k|eval_graph|train_graph|train_docs_graph|train_zero1_graph|train_zero1_fold_graph|train_zero1_fused_wgrad_graph|train_zero1_cb_grad_graph|mixer|fold|profile8k|gaps|graph_gaps|engine_gaps|peers_fold|peers_fold_bamba|peers_fused_wgrad|peers_bamba_16k|fused_wgrad_ab|tiles|ssd_backends|wgrad|cb_grad|cb_grad_ab|peers_cb_grad|mixer_kernels|docs_single|block_types|train_zero1_registry_graph|train_zero1_docs_graph|preset_2.7b_h100|preset_6.7b_h200|preset_13b_reduced_h200|variants2|finetune|long_context|fp8|fp8_2.7b|determinism|determinism_on|inference|x2|x4|x8"
stage=${1:?usage: gpu_runs.sh $stages OUT_DIR}
out=${2:?usage: gpu_runs.sh STAGE OUT_DIR}
data=${DATA:-outputs/embedded/manifest.json}
res="$out/results"
work=${WORK:-/dev/shm/scale}
mkdir -p "$res"
export PYTHONUNBUFFERED=1
log="$out/log.txt"

step() {  # step SECONDS CMD...: run with a time limit, log it, never stop the stage
    local limit=$1; shift
    echo "=== $(date -u +%H:%M:%S) [$limit s] $*" | tee -a "$log"
    timeout "$limit" "$@" >>"$log" 2>&1
    echo "=== exit $? at $(date -u +%H:%M:%S)" | tee -a "$log"
}

matmul_peak() {  # bf16 GEMM TFLOP/s of this GPU: the MFU denominator handed to the trainer
    [ -n "${CHECK_ONLY:-}" ] && { echo 1; return; }
    python3 -c "import torch; from bench.common import matmul_peak_tflops as p; print(round(p(torch.device('cuda')), 1))"
}
gpu_tag() {  # h100 / h200 ...: the result files of the newer stages are named after the card that ran them
    nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | grep -o 'H[0-9]\{3\}' | tr 'H' 'h' || echo gpu
}
preset_run() {  # preset_run LIMIT NAME ARGS...: launch/pretrain.py on one GPU, its .md, metrics and host memory
    local limit=$1 name=$2; shift 2
    local run_dir=/tmp/$name cmd=(deepspeed --num_gpus 1 launch/pretrain.py --resume none "$@"
        --set train.output_dir=/tmp/$name --set train.save_every=0 --set train.save_final=false
        --set train.log_every=1 --set train.wandb.mode=disabled)
    ( while sleep 5; do free -b | awk -v t="$(date -u +%H:%M:%S)" '/^Mem:/ {print t, $3}'; done ) >"$res/${name}_host_mem.txt" 2>/dev/null &
    local sampler=$!
    step "$limit" "${cmd[@]}"
    local rc=$(tail -1 "$log" | grep -o 'exit [0-9]*' | cut -d' ' -f2)
    kill "$sampler" 2>/dev/null
    cp "$run_dir"/metrics.jsonl "$res/${name}_metrics.jsonl" 2>/dev/null
    { echo "# $name: launch/pretrain.py (stage $stage of bench/gpu_runs.sh), exit $rc"; echo
      echo "Device: $(nvidia-smi --query-gpu=name --format=csv,noheader | head -1); date: $(date -u '+%Y-%m-%d %H:%M UTC'); command:"
      echo; echo "    $(printf '%q ' "${cmd[@]}")"; echo
      echo "Per-step rows: ${name}_metrics.jsonl; host memory used (bytes, every 5 s): ${name}_host_mem.txt."
      echo "Peak host memory used: $(sort -k2 -n "$res/${name}_host_mem.txt" | tail -1 | cut -d' ' -f2) bytes."; } >"$res/$name.md"
    return "${rc:-1}"
}
manifest_vocab() {  # the curated tokenizer's vocabulary: the model's vocab_size for these shards
    python3 -c "import json,sys; print(json.load(open(sys.argv[1]))['tokenizer']['vocab_size'])" "$data"
}

case "$stage" in
core)
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >>"$log" 2>&1
    step 60 python3 bench/hw_ceilings.py --out "$res"
    step 300 python3 bench/packing_throughput.py --manifest "$data" --preset 1.3b --seq-len 8192 --iters 8 --out "$res"
    step 150 python3 bench/fwd_bwd_throughput.py --preset 1.3b --seq-len 4096 --batches 2,4 --iters 6 \
        --name fwd_bwd_throughput_1.3b_h100 --out "$res"
    step 90 python3 bench/profile_step.py --preset 1.3b --seq-len 4096 --batch 2 --out "$res"
    ;;
train)
    peak=$(matmul_peak)
    echo "measured bf16 matmul peak: $peak TFLOP/s" | tee -a "$log"
    vocab=$(manifest_vocab)
    run_dir=/tmp/pretrain_1.3b
    step 360 deepspeed --num_gpus 1 launch/pretrain.py --config 1.3b --resume none \
        --set data.manifest="$data" --set data.weights.planted=0 --set model.vocab_size="$vocab" \
        --set train.micro_batch_size=4 --set train.global_batch_tokens=131072 --set train.max_steps=30 \
        --set train.warmup_steps=5 --set train.eval_every=30 --set train.eval_sequences=16 \
        --set train.save_every=0 --set train.log_every=1 --set train.peak_tflops="$peak" \
        --set train.output_dir="$run_dir" --set train.wandb.mode=disabled
    cp "$run_dir"/metrics.jsonl "$res/pretrain_1.3b_zero2_metrics.jsonl" 2>/dev/null
    du -sh "$run_dir"/* "$run_dir"/*/* >>"$log" 2>&1
    step 120 python3 bench/eval_throughput.py --preset small --out eval_throughput_small
    cp bench/results/eval_throughput_small.* "$res"/ 2>/dev/null
    step 200 python3 bench/kernel_parity.py --presets small --seq-len 1024 --batch 2 \
        --cases "bf16 packed,float32 packed" --out "$res"
    ;;
peers)
    step 540 python3 bench/train_step_throughput.py --preset 1.3b --seq-lens 4096,8192,2048 --out "$res"
    ;;
graph)
    step 300 python3 bench/fwd_bwd_throughput.py --preset 1.3b --seq-len 4096 --batches 1,2 --iters 6 --act-ckpt off \
        --cuda-graph --name fwd_bwd_graph_1.3b_h100 --out "$res"
    step 200 python3 bench/profile_step.py --preset 1.3b --seq-len 4096 --batch 2 --sort cpu --out "$res"
    ;;
parts)
    step 300 python3 bench/block_costs.py --preset 1.3b --seq-lens 4096,8192 --tokens 8192 --chunks 128,256 \
        --profile --name block_costs_1.3b_h100 --out "$res"
    ;;
overhead)
    step 90 python3 bench/block_costs.py --preset 1.3b --seq-lens 8192 --tokens 8192 --parts head_loss \
        --name block_costs_head_loss_1.3b_h100 --out "$res"
    step 480 python3 bench/step_overhead.py --preset 1.3b --seq-len 8192 --profile --name step_overhead_1.3b_h100 \
        --out "$res"
    ;;
overhead2)
    step 540 python3 bench/step_overhead.py --preset 1.3b --seq-len 8192 --profile --name step_overhead_knobs_1.3b_h100 \
        --variants "zero1 deepspeed_fold,zero2,zero2 bf16.check_grad_overflow=false,zero2 data_types.grad_accum_dtype=bf16,zero1 bf16.check_grad_overflow=false deepspeed_fold,zero1 overlap_comm=false deepspeed_fold,zero1 contiguous_gradients=false deepspeed_fold" \
        --out "$res"
    ;;
grad_norm)
    step 400 python3 bench/grad_norm_check.py --preset small --fold deepspeed --name grad_norm_check_small_h100 --out "$res"
    ;;
grad_norm_fused_wgrad)
    step 400 python3 bench/grad_norm_check.py --preset small --name grad_norm_check_fused_wgrad_small_h100 --out "$res"
    ;;
peers_fused_ce|peers_saved|peers_zero1|peers_zero1_16k)
    ds=ds_configs/zero2.json name=train_step_throughput_graph_fused_ce_1.3b_h100 seqs=8192,4096 models=ours,attention,hf_bamba
    # (ZeRO-1 runs name the gradient fold they ran with: train/grad_fold.py's default has changed since)
    [ "$stage" = peers_saved ] && name=train_step_throughput_graph_saved_zero2_1.3b_h100
    [ "$stage" = peers_zero1 ] && ds=ds_configs/zero1.json name=train_step_throughput_graph_zero1_1.3b_h100
    [ "$stage" = peers_zero1_16k ] && ds=ds_configs/zero1.json name=train_step_throughput_graph_zero1_16k_1.3b_h100 \
        seqs=16384 models=ours,attention
    step 540 python3 bench/train_step_throughput.py --preset 1.3b --seq-lens $seqs --cuda-graph --graph-only \
        --models $models --ds-config $ds --fold deepspeed --name $name --out "$res"
    ;;
docs_graph)
    step 330 python3 bench/packing_throughput.py --manifest "$data" --preset 1.3b --seq-len 8192 --iters 8 \
        --modes continuous,document,continuous_graph,document_graph --out "$res"
    step 150 python3 bench/fwd_bwd_throughput.py --preset 1.3b --seq-len 4096 --batches 2 --iters 6 --act-ckpt off \
        --cuda-graph --name fwd_bwd_graph_fused_mlp_1.3b_h100 --out "$res"
    step 200 python3 bench/kernel_parity.py --presets small --seq-len 1024 --batch 2 \
        --cases "bf16 packed,float32 packed" --out "$res"
    ;;
peers_graph)
    step 560 python3 bench/train_step_throughput.py --preset 1.3b --seq-lens 4096,8192 --cuda-graph \
        --name train_step_throughput_graph_1.3b_h100 --out "$res"
    ;;
peers_16k)
    step 560 python3 bench/train_step_throughput.py --preset 1.3b --seq-lens 16384 --cuda-graph \
        --models ours,attention,hf_bamba --name train_step_throughput_16k_1.3b_h100 --out "$res"
    ;;
eval_graph)
    step 300 python3 bench/eval_throughput.py --preset small --backends hybrid,hybrid_graph,hf --out eval_throughput_graph_small_h100
    cp bench/results/eval_throughput_graph_small_h100.* "$res"/ 2>/dev/null
    ;;
train_graph|train_docs_graph|train_zero1_graph|train_zero1_fold_graph|train_zero1_fused_wgrad_graph|train_zero1_cb_grad_graph|\
train_zero1_docs_graph|train_zero1_registry_graph)
    peak=$(matmul_peak)
    vocab=$(manifest_vocab)
    packing=continuous name=pretrain_1.3b_graph ds=ds_configs/zero2.json
    [ "$stage" = train_docs_graph ] && packing=document name=pretrain_1.3b_docs_graph
    fold=fused_wgrad  # train.grad_fold (ZeRO-1 only): what each committed run ran with
    [ "$stage" = train_zero1_graph ] && name=pretrain_1.3b_zero1_graph ds=ds_configs/zero1.json fold=deepspeed
    [ "$stage" = train_zero1_fold_graph ] && name=pretrain_1.3b_zero1_fold_graph ds=ds_configs/zero1.json fold=copy_free
    [ "$stage" = train_zero1_fused_wgrad_graph ] && name=pretrain_1.3b_zero1_fused_wgrad_graph ds=ds_configs/zero1.json
    [ "$stage" = train_zero1_cb_grad_graph ] && name=pretrain_1.3b_zero1_cb_grad_graph ds=ds_configs/zero1.json
    [ "$stage" = train_zero1_docs_graph ] && name=pretrain_1.3b_zero1_docs_graph ds=ds_configs/zero1.json packing=document
    [ "$stage" = train_zero1_registry_graph ] && name=pretrain_1.3b_zero1_registry_graph_$(gpu_tag) ds=ds_configs/zero1.json
    run_dir=/tmp/$name
    step 420 deepspeed --num_gpus 1 launch/pretrain.py --config 1.3b --resume none \
        --set data.manifest="$data" --set data.weights.planted=0 --set model.vocab_size="$vocab" \
        --set data.packing=$packing --set train.cuda_graph=true --set train.ds_config=$ds --set train.grad_fold=$fold \
        --set train.micro_batch_size=2 --set train.global_batch_tokens=65536 --set train.max_steps=25 \
        --set train.warmup_steps=5 --set train.eval_every=25 --set train.eval_sequences=16 \
        --set train.save_every=0 --set train.save_final=false --set train.log_every=1 --set train.peak_tflops="$peak" \
        --set train.output_dir="$run_dir" --set train.wandb.mode=disabled
    cp "$run_dir"/metrics.jsonl "$res/${name}_metrics.jsonl" 2>/dev/null
    [ "$stage" = train_zero1_graph ] && step 200 python3 bench/step_overhead.py --preset 1.3b --seq-len 8192 \
        --variants "zero2,zero1 deepspeed_fold" --name step_overhead_zero1_1.3b_h100 --out "$res"
    [ "$stage" = train_zero1_fused_wgrad_graph ] && step 200 python3 bench/step_overhead.py --preset 1.3b --seq-len 8192 \
        --variants "zero1,zero1 copy_free_fold" --name step_overhead_fused_wgrad_1.3b_h100 --out "$res"
    ;;
variants2)
    step 250 python3 bench/state_memory.py --preset small --contexts 1024,8192,32768 --iters 5 --new-tokens 32 --name "state_memory_small_$(gpu_tag)" --out "$res"
    ;;
finetune)
    step 190 python3 bench/finetune_lora_vs_full.py --preset 1.3b --tokenizer "$(dirname "$data")/tokenizer" \
        --name "finetune_lora_vs_full_1.3b_$(gpu_tag)" --out "$res"
    ;;
long_context)
    step 360 python3 bench/long_context.py --preset 1.3b --name "long_context_1.3b_$(gpu_tag)" --out "$res"
    step 150 python3 bench/context_parallel_overhead.py --preset small --seq-len 8192 --batch 2 --docs 4 \
        --name "context_parallel_overhead_small_$(gpu_tag)" --out "$res"
    ;;
fp8|fp8_2.7b)
    peak=$(matmul_peak)
    vocab=$(manifest_vocab)
    common=(--set data.manifest="$data" --set data.weights.planted=0 --set model.vocab_size="$vocab"
            --set train.peak_tflops="$peak" --set train.seq_len=4096 --work /tmp --out "$res" ${CHECK_ONLY:+--check})
    if [ "$stage" = fp8 ]; then
        step 360 python3 bench/fp8_train.py --config 1.3b --variants bf16,fp8 --steps 300 \
            --set train.micro_batch_size=2 --set train.global_batch_tokens=8192 --name "fp8_train_1.3b_$(gpu_tag)" \
            "${common[@]}"
    else
        step 230 python3 bench/fp8_train.py --config 2.7b --variants bf16,fp8 --steps 20 \
            --set train.micro_batch_size=1 --set train.global_batch_tokens=16384 --name "fp8_train_2.7b_$(gpu_tag)" \
            "${common[@]}"
    fi
    ;;
mixer)
    step 180 python3 bench/block_costs.py --preset 1.3b --seq-lens 8192 --tokens 8192 --chunks 256 --attn-backends sdpa \
        --profile --name block_costs_mixer_saved_1.3b_h100 --out "$res"
    step 330 python3 bench/train_step_throughput.py --preset 1.3b --seq-lens 8192,4096 --cuda-graph --graph-only \
        --models ours,attention --ds-config ds_configs/zero1.json --fold deepspeed \
        --name train_step_throughput_graph_saved_zero1_1.3b_h100 \
        --out "$res"
    ;;
fold)
    step 200 python3 bench/step_overhead.py --preset 1.3b --seq-len 8192 --variants "zero1 copy_free_fold,zero1 deepspeed_fold" \
        --name step_overhead_fold_1.3b_h100 --out "$res"
    step 200 python3 bench/block_costs.py --preset 1.3b --seq-lens 16384 --tokens 16384 --chunks 256 \
        --attn-backends sdpa,flash --name block_costs_16k_1.3b_h100 --out "$res"
    ;;
profile8k)
    step 300 python3 bench/profile_step.py --preset 1.3b --seq-len 8192 --batch 1 --kernels --top 80 \
        --name profile_step_kernels_8192_1.3b_h100 --out "$res"
    ;;
gaps)
    step 200 python3 bench/profile_step.py --preset 1.3b --twin --seq-len 8192 --batch 1 --kernels --top 80 \
        --name profile_step_kernels_8192_twin_1.3b_h100 --out "$res"
    step 150 python3 bench/fwd_bwd_throughput.py --preset 1.3b --seq-len 8192 --batches 1 --iters 8 --act-ckpt off \
        --cuda-graph --name fwd_bwd_graph_8192_ours_1.3b_h100 --out "$res"
    step 150 python3 bench/fwd_bwd_throughput.py --preset 1.3b --twin --seq-len 8192 --batches 1 --iters 8 \
        --act-ckpt off --cuda-graph --name fwd_bwd_graph_8192_twin_1.3b_h100 --out "$res"
    ;;
graph_gaps)
    step 260 python3 bench/profile_step.py --preset 1.3b --seq-len 8192 --batch 1 --kernels --cuda-graph --top 80 \
        --name profile_step_graph_kernels_8192_1.3b_h100 --out "$res"
    step 150 python3 bench/profile_step.py --preset 1.3b --twin --seq-len 8192 --batch 1 --kernels --cuda-graph \
        --top 80 --name profile_step_graph_kernels_8192_twin_1.3b_h100 --out "$res"
    ;;
engine_gaps)
    step 330 python3 bench/step_overhead.py --preset 1.3b --seq-len 8192 --variants "zero1 copy_free_fold" --profile \
        --name step_overhead_profile_zero1_1.3b_h100 --out "$res"
    ;;
peers_fold)
    step 540 python3 bench/train_step_throughput.py --preset 1.3b --seq-lens 8192,4096,16384 --cuda-graph --graph-only \
        --models ours,attention --ds-config ds_configs/zero1.json --fold copy_free \
        --name train_step_throughput_graph_fold_zero1_1.3b_h100 \
        --out "$res"
    ;;
peers_fold_bamba)
    step 540 python3 bench/train_step_throughput.py --preset 1.3b --seq-lens 8192,4096 --cuda-graph --graph-only \
        --models ours,hf_bamba --ds-config ds_configs/zero1.json --fold copy_free \
        --name train_step_throughput_graph_fold_zero1_bamba_1.3b_h100 --out "$res"
    ;;
peers_fused_wgrad)
    step 560 python3 bench/train_step_throughput.py --preset 1.3b --seq-lens 8192,4096,16384 --cuda-graph --graph-only \
        --models ours,attention --ds-config ds_configs/zero1.json --name train_step_throughput_graph_fused_wgrad_zero1_1.3b_h100 \
        --out "$res"
    ;;
peers_bamba_16k)
    step 560 python3 bench/train_step_throughput.py --preset 1.3b --seq-lens 16384 --cuda-graph --graph-only \
        --models ours,hf_bamba --ds-config ds_configs/zero1.json \
        --name train_step_throughput_graph_fused_wgrad_zero1_bamba_16k_1.3b_h100 --out "$res"
    ;;
fused_wgrad_ab)
    for fold in copy_free fused_wgrad; do
        step 280 python3 bench/train_step_throughput.py --preset 1.3b --seq-lens 8192,4096 --cuda-graph --graph-only \
            --models ours --ds-config ds_configs/zero1.json --fold $fold \
            --name train_step_throughput_graph_${fold}_ab_zero1_1.3b_h100 --out "$res"
    done
    ;;
tiles)
    step 560 python3 bench/ssd_tiles.py --preset 1.3b --seq-len 8192 --top 5 --warps 4,8 --stages 2,3,4 \
        --name ssd_tiles_1.3b_h100 --out "$res"
    ;;
ssd_backends)
    step 400 python3 bench/ssd_backends.py --preset 1.3b --seq-lens 8192,16384 --fla-chunks 64,128 \
        --name ssd_backends_1.3b_h100 --out "$res"
    ;;
wgrad)
    step 200 python3 bench/wgrad_accumulate.py --preset 1.3b --tokens 8192 --name wgrad_accumulate_1.3b_h100 --out "$res"
    step 300 python3 bench/ssd_backends.py --preset 1.3b --seq-lens 8192,16384 --backends mamba_ssm --chunks 64,128,256 \
        --name ssd_chunks_1.3b_h100 --out "$res"
    ;;
cb_grad)
    step 150 python3 bench/ssd_cb_grad.py --preset 1.3b --seq-lens 8192,16384 --tiles 64x4x3,64x4x4,64x8x3,32x4x3 \
        --name ssd_cb_grad_1.3b_h100 --out "$res"
    step 360 python3 bench/block_costs.py --preset 1.3b --seq-lens 8192,16384 --tokens 8192 --chunks 256 \
        --parts mamba_mixer --profile --name block_costs_cb_grad_1.3b_h100 --out "$res"
    ;;
cb_grad_ab)  # ours alone, mamba_ssm's two kernels / ours / mamba_ssm's again, one machine
    limit=240  # the first run compiles and autotunes
    for cb in mamba_ssm ours mamba_ssm; do
        n=$(( ${n:-0} + 1 ))
        step $limit python3 bench/train_step_throughput.py --preset 1.3b --seq-lens 8192,16384 --cuda-graph --graph-only \
            --models ours --ds-config ds_configs/zero1.json --ssd-cb-grad $cb \
            --name train_step_throughput_graph_cb_grad_ab${n}_${cb}_zero1_1.3b_h100 --out "$res"
        limit=150
    done
    ;;
peers_cb_grad)
    step 560 python3 bench/train_step_throughput.py --preset 1.3b --seq-lens 8192,16384 --cuda-graph --graph-only \
        --models ours,attention --ds-config ds_configs/zero1.json \
        --name "${NAME:-train_step_throughput_graph_cb_grad_zero1_1.3b_h100}" \
        --out "$res"
    ;;
docs_single)
    step 330 python3 bench/packing_throughput.py --manifest "$data" --preset 1.3b --seq-len 8192 --iters 8 \
        --modes continuous,document,continuous_graph,document_graph --name "packing_throughput_graph_single_${RUN:-run1}_h100" \
        --out "$res"
    ;;
block_types)
    step 480 python3 bench/block_types.py --preset small --seq-len 4096 --batch 4 --name "block_types_small_$(gpu_tag)" --out "$res"
    ;;
mixer_kernels)
    step 300 python3 bench/block_costs.py --preset 1.3b --seq-lens 8192,16384 --tokens 8192 --chunks 256 \
        --parts mamba_mixer --profile --profile-top 60 --name block_costs_kernels_1.3b_h100 --out "$res"
    ;;
determinism|determinism_on)
    peak=$(matmul_peak)
    vocab=$(manifest_vocab)
    common=(--config 1.3b --set model.preset=small --set data.manifest="$data" --set data.weights.planted=0
            --set model.vocab_size="$vocab" --set train.micro_batch_size=4 --set train.global_batch_tokens=65536
            --set train.peak_tflops="$peak" --set train.log_every=1 --set train.eval_every=0
            --set train.wandb.mode=disabled --gpus 1 --steps 12 --signal-after 5
            --work "$work" --out "$res" ${CHECK_ONLY:+--check})
    export TRITON_CACHE_AUTOTUNING=1  # each of the 6 launches would otherwise autotune mamba_ssm afresh
    [ "$stage" = determinism ] && step 310 python3 bench/scale_runs.py preempt "${common[@]}" --name determinism_default_small
    dlimit=300; [ "$stage" = determinism_on ] && dlimit=540  # alone: room for a cold first launch
    step $dlimit python3 bench/scale_runs.py preempt "${common[@]}" --set train.deterministic=true \
        --name determinism_on_small
    ;;
preset_2.7b_h100|preset_6.7b_h200|preset_13b_reduced_h200)
    peak=$(matmul_peak)
    vocab=$(manifest_vocab)
    tag=$(gpu_tag)
    data_sets=(--set data.manifest="$data" --set data.weights.planted=0 --set model.vocab_size="$vocab"
               --set data.packing=continuous --set train.seq_len=4096 --set train.warmup_steps=2
               --set train.eval_every=0 --set train.peak_tflops="$peak" --set train.activation_checkpointing=false)
    case "$stage" in
    preset_2.7b_h100)  # the fastest settings measured on 1.3B (graphed ZeRO-1, fused_wgrad); micro-batch 2 if it fits
        graph=(--config 2.7b "${data_sets[@]}" --set train.cuda_graph=true --set train.ds_config=ds_configs/zero1.json
               --set train.grad_fold=fused_wgrad --set train.global_batch_tokens=65536 --set train.max_steps=20)
        preset_run 330 "pretrain_2.7b_$tag" "${graph[@]}" --set train.micro_batch_size=2 ||
            preset_run 150 "pretrain_2.7b_mb1_$tag" "${graph[@]}" --set train.micro_batch_size=1
        ;;
    preset_6.7b_h200)
        preset_run 470 "pretrain_6.7b_offload_$tag" --config 6.7b "${data_sets[@]}" \
            --set train.ds_config=ds_configs/zero2_offload.json --set train.micro_batch_size=2 \
            --set train.global_batch_tokens=32768 --set train.max_steps=10
        ;;
    preset_13b_reduced_h200)
        preset_run 470 "pretrain_13b_reduced_$tag" --config 13b "${data_sets[@]}" --set model.n_layers=18 \
            --set train.ds_config=ds_configs/zero3_offload.json --set train.micro_batch_size=1 \
            --set train.global_batch_tokens=32768 --set train.max_steps=10
        ;;
    esac
    ;;
inference)
    step 150 python3 bench/decode_throughput.py --preset small --models ours,ours_graph,hf,attention --results-dir "$res"
    step 200 python3 bench/decode_throughput.py --preset 1.3b --models ours,ours_graph,hf,attention --results-dir "$res"
    step 240 python3 bench/memory_scaling.py --preset 1.3b --out "$res"
    step 90 python3 bench/profile_step.py --preset 1.3b --decode --batch 1 --seq-len 1024 --sort cpu --out "$res"
    step 90 python3 bench/profile_step.py --preset 1.3b --decode --batch 1 --seq-len 1024 --sort device --out "$res"
    ;;
x2|x4|x8)
    peak=$(matmul_peak)
    vocab=$(manifest_vocab)
    common=(--set data.manifest="$data" --set data.weights.planted=0 --set model.vocab_size="$vocab"
            --set train.peak_tflops="$peak" --set train.log_every=1 --set train.eval_every=0
            --set train.wandb.mode=disabled --work "$work" --out "$res" ${CHECK_ONLY:+--check})
    small=(--config 1.3b --set train.global_batch_tokens=262144)   # 4 x 4096 micro-batches: 16 / 8 / 4 / 2 per step
    big=(--config 13b --set train.global_batch_tokens=65536)       # 1 x 4096 micro-batches: 8 / 4 / 2 per step
    n=${stage#x}
    case "$stage" in
    x2)
        step 420 python3 bench/scale_runs.py scaling "${small[@]}" --gpus 1,2 --steps 30 --name scale_1.3b_x2 "${common[@]}"
        step 420 python3 bench/scale_runs.py preempt "${small[@]}" --gpus 2 --resume-gpus 1 --steps 20 \
            --signal-after 8 --name preempt_1.3b_x2 "${common[@]}"
        step 420 python3 bench/scale_runs.py preempt "${small[@]}" --gpus 2 --resume-gpus 1 --steps 20 \
            --signal-after 8 --set train.deterministic=true --name preempt_1.3b_x2_deterministic "${common[@]}"
        step 540 python3 bench/scale_runs.py scaling "${big[@]}" --gpus 2 --steps 20 --name scale_13b_zero3_x2 "${common[@]}"
        ;;
    x4)
        step 540 python3 bench/scale_runs.py scaling "${small[@]}" --gpus 1,2,4 --steps 30 --name scale_1.3b_x4 "${common[@]}"
        step 540 python3 bench/scale_runs.py scaling "${big[@]}" --gpus 4 --steps 20 --name scale_13b_zero3_x4 "${common[@]}"
        step 540 python3 bench/scale_runs.py scaling "${big[@]}" --gpus 4 --steps 20 \
            --set train.ds_config=ds_configs/zero3_offload.json --name scale_13b_zero3_offload_x4 "${common[@]}"
        step 420 python3 bench/scale_runs.py preempt "${small[@]}" --gpus 4 --resume-gpus 2 --steps 20 \
            --signal-after 8 --name preempt_1.3b_x4 "${common[@]}"
        ;;
    x8)  # the README's command (config 1.3b, then 13b) through the driver, which adds only the --set above
        step 420 python3 bench/scale_runs.py scaling "${small[@]}" --gpus 8 --steps 30 --name readme_1.3b_x8 "${common[@]}"
        step 540 python3 bench/scale_runs.py scaling "${big[@]}" --gpus 8 --steps 30 --name readme_13b_x8 "${common[@]}"
        step 420 python3 bench/scale_runs.py preempt "${small[@]}" --gpus 8 --steps 20 --signal-after 8 \
            --name preempt_1.3b_x8 "${common[@]}"
        ;;
    esac
    echo "stage $stage on $n GPUs done" >>"$log"
    ;;
*)
    echo "unknown stage $stage ($stages)" >&2
    exit 2
    ;;
esac
tar -czf "$out/results.tgz" -C "$out" results
