#!/usr/bin/env bash
# The GPU checks of `run --device cuda` (issue 6 item 5; issue 12's GPU rows), as one script for a machine with an
# NVIDIA GPU and a CUDA build of torch, run from the repository's root:
#
#     OUT=/tmp/gpu-check bash tools/gpu_check.sh      # about 8 minutes on one H100 with 16 cores
#
# It needs torch, transformers, accelerate, safetensors, tokenizers, psutil, tqdm and pytest (a machine without the
# network is fine: nothing is downloaded; the checkpoints are made here from configs). Each step is bounded by
# `timeout`, prints what it measured and leaves it under $OUT:
#   env.json         torch, CUDA and the GPU's name
#   pytest.txt       the tests that take the GPU where one is there: every factorisation route and the profile's
#                    spectra on the GPU against the CPU, a tiny job with --device cuda against the CPU job (ranks equal,
#                    losses to 1e-4, the GPU's measured peak under its plan and budget), bench_precision's GPU rows
#                    under the plan's count
#   precision.jsonl  tools/bench_precision.py on 7B shapes, GPU then CPU of the same machine: time and loss, float64
#                    and float32, and the GPU's measured peak against the plan's count per step
#   block-*.jsonl    one 7B-shape block (random weights, bf16) compressed end to end with --device cuda and on the CPU:
#                    seconds split by stage (forwards and factorisations on the GPU against the CPU's), peak RSS, the
#                    GPU's peak; then the two outputs' factors compared (block-compare.json); and the default job
#                    (compensated, its own profile) on the GPU alone (block-default-cuda.jsonl)
#   eval.json        `streamsvd eval --device cuda` of that block's output against the CPU: perplexity, seconds, GPU peak
#   ranks.json       a tiny job on two torchrun processes sharing the GPU (issue 12) against one process on it
# docs/RESULTS.md, "GPU (--device cuda)", says what to copy where.
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/tests PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpu-check-work}
rm -rf "$WORK" && mkdir -p "$WORK"

$PY - > "$OUT/env.json" <<'EOF'
import json, os, torch
d = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if d else None,
                  "gpu_bytes": torch.cuda.get_device_properties(0).total_memory if d else None, "cpus": os.cpu_count()}))
EOF
cat "$OUT/env.json"

echo "== tests that take the GPU"
timeout 240 $PY -m pytest -q -p no:cacheprovider -n 0 tests/math/test_device.py tests/job/test_device_run.py \
    tests/job/test_eval_device.py tests/tools/test_bench_precision.py 2>&1 | tail -25 | tee "$OUT/pytest.txt"

echo "== factorisation, GPU then CPU (7B shapes)"
timeout 180 $PY tools/bench_precision.py --skip-real --large --shapes ${SHAPES:-4096x4096 11008x4096} --ratios 0.4 \
    --device cuda --device cpu | tee "$OUT/precision.jsonl"

echo "== one 7B-shape block end to end"
# HIDDEN / INTER / HEADS: smaller shapes to try the script itself on a small machine
timeout 60 $PY - "$WORK/model" "${HIDDEN:-4096}" "${INTER:-11008}" "${HEADS:-32}" <<'EOF'
import sys, torch
from tiny_models import make_tiny_checkpoint
hidden, inter, heads = map(int, sys.argv[2:5])
make_tiny_checkpoint("llama", sys.argv[1], dtype=torch.bfloat16, max_shard_size="2GB", hidden_size=hidden,
                     intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=heads, num_hidden_layers=1,
                     max_position_embeddings=4096)
EOF
for dev in cuda cpu; do
    timeout 150 $PY tools/bench_scale.py "$WORK/model" --out "$WORK/out-$dev" --max-mem 16G --no-compensate \
        --calib-samples 8 --seqlen 512 --device $dev 2>&1 | tail -4 | tee "$OUT/block-$dev.jsonl"
done
# the default job (compensated, its own profile: the profile's forward and backward on the GPU too), GPU only
timeout 120 $PY tools/bench_scale.py "$WORK/model" --out "$WORK/out-default" --max-mem 16G --alloc global \
    --calib-samples 8 --seqlen 512 --device cuda 2>&1 | tail -3 | tee "$OUT/block-default-cuda.jsonl"
timeout 60 $PY - "$WORK/out-cuda" "$WORK/out-cpu" <<'EOF' | tee "$OUT/block-compare.json"
import json, os, sys
if not all(os.path.exists(f"{d}/streamsvd_report.json") for d in sys.argv[1:3]):
    sys.exit(print(json.dumps({"compared": False, "why": "a block job above did not finish"})))
a, b = (json.load(open(f"{d}/streamsvd_report.json"))["modules"] for d in sys.argv[1:3])
worst = max(abs(a[n]["truncation_loss"] / b[n]["truncation_loss"] - 1) for n in b)
print(json.dumps({"linears": len(b), "same_ranks": all(a[n]["rank"] == b[n]["rank"] for n in b),
                  "largest_relative_loss_difference": worst}))
EOF

echo "== streamsvd eval --device cuda against the CPU (the 7B-shape block's output above)"
timeout 30 $PY -c "from streamsvd.io.calibration import default_text; open('$WORK/text.txt', 'w').write(default_text()[:400000])"
for dev in cuda cpu; do
    timeout 90 $PY -m streamsvd eval "$WORK/out-cpu" --text "$WORK/text.txt" --seqlen 512 --max-windows 16 --json \
        --no-progress --device $dev > "$WORK/eval-$dev.json" 2> "$OUT/eval-$dev.err"
done
timeout 30 $PY - "$WORK/eval-cuda.json" "$WORK/eval-cpu.json" <<'EOF2' | tee "$OUT/eval.json"
import json, sys
try:
    gpu, cpu = (json.loads(open(p).read()) for p in sys.argv[1:3])
except (OSError, ValueError):
    sys.exit(print(json.dumps({"compared": False, "why": "an eval above failed (eval-*.err)"})))
print(json.dumps({"ppl_cuda": gpu["perplexity"], "ppl_cpu": cpu["perplexity"],
                  "relative_difference": abs(gpu["perplexity"] / cpu["perplexity"] - 1), "seconds_cuda": gpu["seconds"],
                  "seconds_cpu": cpu["seconds"], "gpu_peak_bytes": gpu.get("gpu_peak_bytes"),
                  "max_gpu_mem_bytes": gpu.get("max_gpu_mem_bytes"), "head_on_device": gpu.get("head_on_device")}))
EOF2

echo "== two processes sharing the GPU (torchrun) against one"
timeout 30 $PY -c "from tiny_models import make_tiny_checkpoint; make_tiny_checkpoint('llama', '$WORK/tiny')"
R="--calib-samples 8 --seqlen 32 --batch-size 2 --no-plots --no-progress --device cuda:0 --max-gpu-mem 4G"
OMP_NUM_THREADS=1 timeout 90 $PY -m streamsvd run "$WORK/tiny" "$WORK/one" $R > "$OUT/ranks-one.txt" 2>&1
OMP_NUM_THREADS=1 timeout 120 $PY -m torch.distributed.run --standalone --nproc-per-node 2 -m streamsvd run "$WORK/tiny" \
    "$WORK/two" $R > "$OUT/ranks-two.txt" 2>&1
timeout 30 $PY - "$WORK/one" "$WORK/two" <<'EOF' | tee "$OUT/ranks.json"
import json, pathlib, sys
one, two = map(pathlib.Path, sys.argv[1:3])
shards = sorted(p.name for p in one.glob("*.safetensors"))
same = [n for n in shards if (two / n).exists() and (two / n).read_bytes() == (one / n).read_bytes()]
print(json.dumps({"shards": len(shards), "byte_identical": len(same), "two_finished": (two / "streamsvd_report.json").exists()}))
EOF
