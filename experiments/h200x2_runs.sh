#!/bin/bash
# The GPU rows still to measure, as calls of under 10 minutes on a lent `nvidia-h200-x2`
# (two H200s of one host): single-GPU cases run two at a time, one per GPU, each in its own
# process (its own peak memory); the two-GPU cases use both. Results under $OUT (the device
# tool's output folder; default /tmp/h200x2) as one .tgz per phase plus logs.
#
#   bash experiments/h200x2_runs.sh train     # issue 14: gpu-small at 32K and 128K, hybrid | dense
#   bash experiments/h200x2_runs.sh fsdp      # issue 14: fsdp=2 vs 1 GPU at 36K (7B slice)
#   bash experiments/h200x2_runs.sh sequence  # issue 17: sequence=2 vs 1 GPU at 128K (7B slice),
#                                             # issue 13: text-row tile sweep (experiments/row_tiles.py)
#   bash experiments/h200x2_runs.sh full      # issue 14: the whole 7B on fsdp=2 at 36K
#   bash experiments/h200x2_runs.sh profile   # issue 31: the 7B slice at 36K by part (and its
#                                             # dense twin), then remat policies (one GPU)
#
# Wheels the device image lacks (grain, av, array-record, portpicker) are installed from
# `.whl/` when it exists (carry it).
set -u
OUT=${OUT:-/tmp/h200x2}; mkdir -p "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_ALLOCATOR=cuda_async
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=$PWD:/tmp/site
fi
R=experiments/results
small=(model.text.num_hidden_layers=4 model.vision.depth=8 model.vision.fullatt_block_indexes=7)
bench() {  # GPUS TIMEOUT NAME ARGS...: one bench_train.py run, its log under $OUT
  local gpus=$1 limit=$2 name=$3; shift 3
  CUDA_VISIBLE_DEVICES=$gpus timeout "$limit" python3 experiments/bench_train.py "$@" \
    > "$OUT/log_$name.txt" 2>&1
  echo "$name: exit $?"
}
case ${1:-} in
  train)  # one GPU each: the 3B-shaped VideoNSA and its dense twin, 32K then 128K
    bench 0 540 gpu_small_hybrid --config gpu-small --lengths 32768,131072 --steps 2 --no-twin \
      --out $R/bench_train_h200/gpu_small_hybrid &
    bench 1 540 gpu_small_dense --config gpu-small --lengths 32768,131072 --steps 2 --no-twin \
      --out $R/bench_train_h200/gpu_small_dense model.attention.nsa=null &
    wait ;;
  fsdp)  # losses on 2 GPUs against 1 GPU (a slice of the 7B that one GPU holds), then speed
    bench 0 170 v36k_small_fsdp1 --config videonsa-7b-36k --lengths 36864 --rows 2 --mesh fsdp=1 \
      --no-twin --steps 3 --out $R/bench_train_h200x2/v36k_small_fsdp1 "${small[@]}"
    bench 0,1 170 v36k_small_fsdp2 --config videonsa-7b-36k --lengths 36864 --rows 2 \
      --mesh fsdp=2 --no-twin --steps 3 --out $R/bench_train_h200x2/v36k_small_fsdp2 "${small[@]}"
    python3 experiments/bench_train.py --compare $R/bench_train_h200x2/v36k_small_fsdp2/results.json \
      $R/bench_train_h200x2/v36k_small_fsdp1/results.json ;;
  sequence)  # the same at 128K with the tokens on sequence=2; one micro-batch per step. The
    # 1-GPU case runs beside the text-row tile sweep (issue 13) on the other GPU
    bench 0 300 v128k_small_seq1 --config videonsa-7b-128k --lengths 131072 --rows 1 \
      --mesh sequence=1 --no-twin --steps 2 --out $R/bench_train_h200x2/v128k_small_sequence1 \
      grad_accum=1 "${small[@]}" &
    CUDA_VISIBLE_DEVICES=1 timeout 300 python3 experiments/row_tiles.py \
      --out $R/row_tiles_h200 --lengths 131072,32768 > "$OUT/log_row_tiles.txt" 2>&1 &
    wait
    bench 0,1 270 v128k_small_seq2 --config videonsa-7b-128k --lengths 131072 --rows 1 \
      --mesh sequence=2 --no-twin --steps 2 --out $R/bench_train_h200x2/v128k_small_sequence2 \
      grad_accum=1 "${small[@]}"
    python3 experiments/bench_train.py --compare \
      $R/bench_train_h200x2/v128k_small_sequence2/results.json \
      $R/bench_train_h200x2/v128k_small_sequence1/results.json ;;
  full)  # the whole 7B on fsdp=2 at 36K: tokens/s per GPU, MFU, memory per GPU
    bench 0,1 540 v36k_fsdp2 --config videonsa-7b-36k --lengths 36864 --rows 2 --mesh fsdp=2 \
      --no-twin --steps 2 --out $R/bench_train_h200x2/v36k_fsdp2 ;;
  profile)  # one GPU, one micro-batch of 2 rows a step: the step by part (the twin in the same
    # process, so its peak memory is not its own; the compiled step's is), then two remat
    # policies against the config's (full); the traces themselves are not kept
    bench 0 190 v36k_small_profile --config videonsa-7b-36k --lengths 36864 --rows 2 \
      --mesh fsdp=1 --steps 1 --profile --out $R/bench_train_h200/v36k_small_profile \
      grad_accum=1 "${small[@]}"
    bench 0 110 v36k_small_remat --config videonsa-7b-36k --lengths 36864 --rows 2 \
      --mesh fsdp=1 --steps 1 --no-twin --remat-policies save_dot_except_mlp,minimal_offloaded \
      --out $R/bench_train_h200/v36k_small_remat grad_accum=1 "${small[@]}"
    rm -rf $R/bench_train_h200/v36k_small_profile/trace_*
    grep -h "^|\|span" "$OUT"/log_v36k_small_profile.txt ;;
  *) echo "usage: $0 train|fsdp|sequence|full|profile" >&2; exit 2 ;;
esac
tar czf "$OUT/${1}.tgz" $R/bench_train_h200* $R/row_tiles_h200 2>/dev/null
grep -h '"tokens_per_s"\|Error\|error' "$OUT"/log_*.txt | cut -c1-300
