#!/bin/bash
# device call 1 of the kernels helper (issue 30): GPU tests of the new paths, selected-branch
# token tiles vs today's kernel, the whole layer vs cuDNN, tokamax if time remains
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda PYTHONPATH=$PWD XLA_PYTHON_CLIENT_PREALLOCATE=false
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee $OUT/gpu.txt
T0=$SECONDS
timeout 110 python3 -m pytest -q -p no:cacheprovider -n 0 -m gpu tests/test_gpu_kernels.py \
  -k "compiled and (bf16-g7-tiles9 or bf16-g7-overlap or f32-g7-overlap or bf16-g16-d64-tiles8)" \
  --durations=6 > $OUT/tests.log 2>&1; echo "tests rc=$? t=$((SECONDS-T0))"; tail -12 $OUT/tests.log
for kind in random smooth; do
  timeout 90 python3 experiments/bench_attention.py --out $OUT/s_$kind --no-check --variants none \
    --lengths 32768 --shapes videonsa28 --breakdown 32768,131072 --tune "slc_tokens=9" \
    --stages selected --inputs $kind > $OUT/s_$kind.log 2>&1
  echo "stage $kind rc=$? t=$((SECONDS-T0))"; grep "^| videonsa" $OUT/s_$kind.log; grep -h union $OUT/s_$kind/results.json
done
timeout 120 python3 experiments/bench_attention.py --out $OUT/l_smooth --no-check --variants ours,cudnn \
  --lengths 131072,32768 --shapes videonsa28 --tune "slc_tokens=9" --inputs smooth > $OUT/l_smooth.log 2>&1
echo "layer rc=$? t=$((SECONDS-T0))"; grep "^| videonsa" $OUT/l_smooth.log
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site .whl/*.whl > $OUT/pip.log 2>&1
PYTHONPATH=$PWD:/tmp/site timeout 60 python3 experiments/tokamax_attention.py --out $OUT/tk --lengths 32768 > $OUT/tk.log 2>&1
echo "tokamax rc=$? t=$((SECONDS-T0))"; grep -v Warning $OUT/tk.log | tail -12
