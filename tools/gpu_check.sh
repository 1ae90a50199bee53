#!/usr/bin/env bash
# The GPU checks of `run --device cuda` (issue 6 item 5; issue 12's GPU rows), as one script for a machine with an
# NVIDIA GPU and a CUDA build of torch, run from the repository's root:
#
#     OUT=/tmp/gpu-check bash tools/gpu_check.sh                   # ends within BUDGET seconds (default 420)
#     run(command="bash tools/gpu_check.sh", timeout_s=480)         # the device tool: $OUT is set there
#
# It needs torch, transformers, accelerate, safetensors, tokenizers, psutil, tqdm and pytest (a machine without the
# network is fine: nothing is downloaded; the checkpoints are made here from configs). The device machines lent to
# this project have all of them (/work/.library/device/KINDS.md).
#
# The whole script ends within BUDGET seconds: each step's `timeout` is the smaller of its own bound and what is left,
# and a step with under 15 s left is skipped (steps.jsonl says so). The steps run most-needed first, so a short lease
# still brings back the rows docs/RESULTS.md most lacks: the block on the GPU against the CPU (issue 6 item 5), the
# eval, the two processes on one GPU (issue 12), then the GPU tests, float32 against float64, and the default job.
# A second call with SKIP="block eval" (names as in steps.jsonl) runs only the rest.
#
# What comes back, at most 8 files (the device tool returns no more):
#   env.json         torch, CUDA, the GPU's name, the cores
#   steps.jsonl      one line per step: name, seconds, exit status, skipped or not
#   log.txt          everything every step printed
#   block.jsonl      one 7B-shape block (random weights, bf16) compressed end to end with --device cuda and on the CPU
#                    (`run` tags each of tools/bench_scale.py's lines: cuda, cpu, default-cuda): seconds by stage, peak
#                    RSS, the GPU's peak; the default job (compensated, its own profile) on the GPU alone
#   checks.jsonl     the comparisons: the two blocks' ranks and losses (block), `eval --device cuda` against the CPU
#                    (eval), two torchrun processes sharing the GPU against one (ranks)
#   pytest.txt       the tests that take the GPU where one is there: every factorisation route and the profile's
#                    spectra on the GPU against the CPU, tiny jobs with --device cuda against the CPU (ranks equal,
#                    losses to 1e-4, the GPU's measured peak under its plan and budget), bench_precision's GPU rows
#   precision.jsonl  tools/bench_precision.py on 7B shapes, GPU then CPU of the same machine: time and loss, float64
#                    and float32, and the GPU's measured peak against the plan's count per step
# docs/RESULTS.md, "GPU (--device cuda)", says what to copy where.
#
# HIDDEN / INTER / HEADS: smaller block shapes; GPU=cpu runs every step on the CPU instead (to try the script itself
# on a machine without a GPU: the figures then mean nothing).
set -u
OUT=${OUT:-/tmp/gpu-check}
mkdir -p "$OUT"
export PYTHONPATH=$PWD:$PWD/tests PYTHONUNBUFFERED=1
PY=${PYTHON:-python3}
WORK=${WORK:-/tmp/gpu-check-work}
BUDGET=${BUDGET:-420}
GPU=${GPU:-cuda}
SKIP=" ${SKIP:-} "
rm -rf "$WORK" && mkdir -p "$WORK"
exec > >(tee -a "$OUT/log.txt") 2>&1
START=$SECONDS

# step NAME BOUND: whether to run step NAME now; sets T, its timeout (BOUND, or what is left of BUDGET if less)
step() {
    local left=$((BUDGET - (SECONDS - START)))
    T=$(($2 < left ? $2 : left))
    if [[ "$SKIP" == *" $1 "* ]] || ((T < 15)); then
        echo "{\"step\": \"$1\", \"skipped\": true, \"seconds_left\": $left}" >> "$OUT/steps.jsonl"
        echo "== $1: skipped (SKIP, or $left s of the budget left)"
        return 1
    fi
    STEP=$1 STEP_START=$SECONDS
    echo "== $1 (at most $T s)"
}
done_step() { echo "{\"step\": \"$STEP\", \"seconds\": $((SECONDS - STEP_START)), \"rc\": $1}" >> "$OUT/steps.jsonl"; }
# tag NAME: bench_scale's JSON lines with "run": NAME added, to block.jsonl; its other output to the log
tag() {
    $PY -c '
import json, sys
for line in sys.stdin:
    if line.startswith("{"):
        print(json.dumps({"run": sys.argv[1], **json.loads(line)}), flush=True)
    else:
        sys.stderr.write(line)' "$1" >> "$OUT/block.jsonl"
}

$PY - > "$OUT/env.json" <<'EOF'
import json, os, torch
d = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "gpu": torch.cuda.get_device_name(0) if d else None,
                  "gpu_bytes": torch.cuda.get_device_properties(0).total_memory if d else None, "cpus": os.cpu_count()}))
EOF
cat "$OUT/env.json"

if step block 330; then
    # one 7B-shape block: made here, then compressed on the GPU and on the CPU, and the two outputs compared
    deadline=$((SECONDS + T))
    timeout $T $PY - "$WORK/model" "${HIDDEN:-4096}" "${INTER:-11008}" "${HEADS:-32}" <<'EOF'
import sys, torch
from tiny_models import make_tiny_checkpoint
hidden, inter, heads = map(int, sys.argv[2:5])
make_tiny_checkpoint("llama", sys.argv[1], dtype=torch.bfloat16, max_shard_size="2GB", hidden_size=hidden,
                     intermediate_size=inter, num_attention_heads=heads, num_key_value_heads=heads, num_hidden_layers=1,
                     max_position_embeddings=4096)
EOF
    rc=$?
    for dev in $GPU cpu; do
        left=$((deadline - SECONDS))
        ((left < 10)) && break
        timeout $left $PY tools/bench_scale.py "$WORK/model" --out "$WORK/out-$dev" --max-mem 16G --no-compensate \
            --calib-samples 8 --seqlen 512 --device $dev 2> "$WORK/block-$dev.err" | tag "$dev"
        rc=$((rc | PIPESTATUS[0]))
        tail -4 "$WORK/block-$dev.err"
    done
    timeout 60 $PY - "$WORK/out-$GPU" "$WORK/out-cpu" <<'EOF' | tee -a "$OUT/checks.jsonl"
import json, os, sys
if not all(os.path.exists(f"{d}/streamsvd_report.json") for d in sys.argv[1:3]):
    sys.exit(print(json.dumps({"check": "block", "compared": False, "why": "a block job above did not finish"})))
a, b = (json.load(open(f"{d}/streamsvd_report.json"))["modules"] for d in sys.argv[1:3])
worst = max(abs(a[n]["truncation_loss"] / b[n]["truncation_loss"] - 1) for n in b)
print(json.dumps({"check": "block", "linears": len(b), "same_ranks": all(a[n]["rank"] == b[n]["rank"] for n in b),
                  "largest_relative_loss_difference": worst}))
EOF
    done_step $rc
fi

if step eval 150; then
    # `streamsvd eval --device cuda` of the block's output (the CPU job's) against the CPU
    timeout 30 $PY -c "from streamsvd.io.calibration import default_text; open('$WORK/text.txt', 'w').write(default_text()[:400000])"
    rc=0
    for dev in $GPU cpu; do
        timeout $((T / 2)) $PY -m streamsvd eval "$WORK/out-cpu" --text "$WORK/text.txt" --seqlen 512 --max-windows 16 \
            --json --no-progress --device $dev > "$WORK/eval-$dev.json" 2> "$WORK/eval-$dev.err"
        rc=$((rc | $?))
        tail -3 "$WORK/eval-$dev.err"
    done
    timeout 30 $PY - "$WORK/eval-$GPU.json" "$WORK/eval-cpu.json" <<'EOF' | tee -a "$OUT/checks.jsonl"
import json, sys
try:
    gpu, cpu = (json.loads(open(p).read()) for p in sys.argv[1:3])
except (OSError, ValueError):
    sys.exit(print(json.dumps({"check": "eval", "compared": False, "why": "an eval above failed (log.txt)"})))
print(json.dumps({"check": "eval", "ppl_cuda": gpu["perplexity"], "ppl_cpu": cpu["perplexity"],
                  "relative_difference": abs(gpu["perplexity"] / cpu["perplexity"] - 1), "seconds_cuda": gpu["seconds"],
                  "seconds_cpu": cpu["seconds"], "gpu_peak_bytes": gpu.get("gpu_peak_bytes"),
                  "max_gpu_mem_bytes": gpu.get("max_gpu_mem_bytes"), "head_on_device": gpu.get("head_on_device")}))
EOF
    done_step $rc
fi

if step ranks 150; then
    # issue 12: a tiny job on two torchrun processes sharing the GPU against one process on it
    timeout 30 $PY -c "from tiny_models import make_tiny_checkpoint; make_tiny_checkpoint('llama', '$WORK/tiny')"
    R="--calib-samples 8 --seqlen 32 --batch-size 2 --no-plots --no-progress --device ${GPU/cuda/cuda:0}"
    [[ $GPU == cuda ]] && R="$R --max-gpu-mem 4G"
    OMP_NUM_THREADS=1 timeout $((T / 3)) $PY -m streamsvd run "$WORK/tiny" "$WORK/one" $R > "$WORK/ranks-one.txt" 2>&1
    rc=$?
    OMP_NUM_THREADS=1 timeout $((T / 2)) $PY -m torch.distributed.run --standalone --nproc-per-node 2 -m streamsvd run \
        "$WORK/tiny" "$WORK/two" $R > "$WORK/ranks-two.txt" 2>&1
    rc=$((rc | $?))
    tail -3 "$WORK/ranks-one.txt" "$WORK/ranks-two.txt"
    timeout 30 $PY - "$WORK/one" "$WORK/two" <<'EOF' | tee -a "$OUT/checks.jsonl"
import json, pathlib, sys
one, two = map(pathlib.Path, sys.argv[1:3])
shards = sorted(p.name for p in one.glob("*.safetensors"))
same = [n for n in shards if (two / n).exists() and (two / n).read_bytes() == (one / n).read_bytes()]
print(json.dumps({"check": "ranks", "shards": len(shards), "byte_identical": len(same),
                  "two_finished": (two / "streamsvd_report.json").exists()}))
EOF
    done_step $rc
fi

if step pytest 240; then
    timeout $T $PY -m pytest -q -p no:cacheprovider -n 0 tests/math/test_device.py tests/job/test_device_run.py \
        tests/job/test_eval_device.py tests/tools/test_bench_precision.py 2>&1 | tail -25 > "$OUT/pytest.txt"
    rc=${PIPESTATUS[0]}
    cat "$OUT/pytest.txt"
    done_step $rc
fi

if step precision 180; then
    # float32 against float64, GPU then CPU (7B shapes)
    timeout $T $PY tools/bench_precision.py --skip-real --large --shapes ${SHAPES:-4096x4096 11008x4096} --ratios 0.4 \
        --device $GPU --device cpu | tee -a "$OUT/precision.jsonl"
    done_step ${PIPESTATUS[0]}
fi

if step default 150; then
    # the default job (compensated, its own profile: the profile's forward and backward on the GPU too), GPU only
    if [[ -d "$WORK/model" ]]; then
        timeout $T $PY tools/bench_scale.py "$WORK/model" --out "$WORK/out-default" --max-mem 16G --alloc global \
            --calib-samples 8 --seqlen 512 --device $GPU 2> "$WORK/block-default.err" | tag "default-$GPU"
        rc=${PIPESTATUS[0]}
        tail -3 "$WORK/block-default.err"
    else
        echo "no block checkpoint (the block step did not run)"; rc=1
    fi
    done_step $rc
fi
echo "== done in $((SECONDS - START)) s of $BUDGET"
