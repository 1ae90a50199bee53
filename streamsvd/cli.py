"""The `streamsvd` command line. Every user-facing failure ends as one `error:` line and exit 2."""

from __future__ import annotations

import argparse
import errno
import json
import math
import os
import sys
from pathlib import Path

from .errors import RERUN, StreamSVDError

EPILOG = "Run `streamsvd COMMAND --help` for each command's flags."


def _add_run(sub) -> None:
    p = sub.add_parser(
        "run",
        help="compress a checkpoint (streaming, resumable)",
        description="Compress every linear layer of the decoder blocks of MODEL_DIR by activation-aware truncated "
        "SVD, one block at a time, and write the result to OUT_DIR. Rerun the same command after an "
        "interruption to resume.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face checkpoint: config.json, safetensors, tokenizer")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new or empty directory, or the OUT_DIR of an interrupted job to resume")
    _add_job_flags(p)


def _add_job_flags(p) -> None:
    """Every flag of `run` but its two folders: `plan` takes them all too, so a run command can be planned as typed."""
    p.add_argument("--ratio", type=float, default=None,
                   help="fraction of each compressed linear's parameters to remove, in (0, 1) (default 0.4)")
    p.add_argument("--max-mem", default=None, help="memory budget, e.g. 24G or 512M; sizes the batches (default: 75%% of available RAM); "
                   "under torchrun, per process")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="windows per batch (default on the CPU: about 2,048 tokens' worth, ceil(2048 / --seqlen), or fewer if "
                   "--max-mem needs; larger batches cost time there, not save it (docs/RESULTS.md); with --device cuda "
                   "the largest that fits; under torchrun at most a process's share). A job on N processes writes the bytes a one-process job with the same batch size writes "
                   "(docs/DESIGN.md, \"Distributed runs\")")
    p.add_argument("--calib", action="append", default=[], metavar="FILE",
                   help="calibration text: plain text or .jsonl with a \"text\" field; repeat for several files "
                   "(default: Python's built-in reference documentation)")
    p.add_argument("--calib-samples", type=int, default=64, help="number of calibration windows (default 64)")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    p.add_argument("--seed", type=_seed, default=0, help="seed for choosing the calibration windows (default 0)")
    p.add_argument("--method", choices=["eig", "cholesky", "svd"], default="eig",
                   help="eig: SVD-LLM V2 loss-optimised truncation (default, never fails on singular statistics); "
                   "cholesky: SVD-LLM whitening; svd: plain SVD of the weights (baseline, ignores activations)")
    p.add_argument("--propagate", choices=["compressed", "original"], default="compressed",
                   help="feed each block the outputs of the compressed (default) or original previous blocks")
    p.add_argument("--act-dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                   help="dtype of the on-disk block activations (default float32; 16-bit halves the disk use)")
    p.add_argument("--work-dir", default=None, metavar="DIR",
                   help="where the block activations are kept while the job runs (two files of calib-samples x "
                   "seqlen x hidden each; default: OUT_DIR/.streamsvd-work); a fast local disk helps")
    p.add_argument("--factors", choices=["pivoted", "plain"], default="pivoted",
                   help="stored form of each compressed linear: pivoted (default) keeps A' (out x r), B' (r x (in-r)) "
                   "and the input order (pivots first), r(out+in-r) numbers, so the same ratio affords a higher rank; costs one "
                   "index gather of the input per linear at inference and a pivot search (seconds per matrix) when "
                   "compressing. plain: two factors, r(out+in) numbers (the form before this flag)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--restart", action="store_true",
                   help="start over: first remove streamsvd's own files from OUT_DIR (state, shards, spectra/, reports, "
                   "run log, work folder; it prints what it removes) and leaves every other file alone. Costs the "
                   "finished blocks: the whole job runs again")
    _add_svd_flag(p)
    _add_quality_flags(p)
    _add_quant_flags(p)
    p.add_argument("--no-plots", action="store_true",
                   help="do not draw allocation.png and spectra.png at the end (they cost a few seconds and about "
                   "100 MiB of memory, which sets the smallest --max-mem only for tiny models)")
    p.add_argument("--alloc", choices=["uniform", "v2", "global"], default=None,
                   help="how the --ratio budget is shared out: global (default: greedy over all matrices by "
                   "token-weighted sensitivity x truncation loss per parameter; 14-23%% lower held-out perplexity than uniform "
                   "in the calibration's domain and 31-60%% lower across domains on SmolLM2 and Gemma 3 at 0.2-0.6, "
                   "docs/RESULTS.md), "
                   "uniform (every linear loses the same fraction; no profile, so one streamed pass less), v2 (SVD-LLM V2's per-type ratios from the truncation loss; worse than uniform here). "
                   "v2 and global need a profile: --profile, or one is made in OUT_DIR/profile first (about a quarter of a "
                   "default job's time on the small models; --profile-samples)")
    p.add_argument("--rank-multiple", type=int, default=1, metavar="K",
                   help="every rank a multiple of K (or full rank), still within the --ratio budget (default 1)")
    p.add_argument("--shrink", type=float, default=0.0, metavar="A",
                   help="read every input Gram as (1 - A) G + A diag(G) when factoring, in [0, 1) (default 0: G itself). "
                   "Fits the calibration text less hard, but measure before relying on it: at --ratio 0.4, A = 0.3 lowered "
                   "SmolLM2's held-out perplexity 10%% in the calibration's domain and 31%% in another, yet raised Gemma 3's "
                   "67%%, and A = 0.5 broke SmolLM2 (docs/RESULTS.md). No extra cost. The profile's spectra (allocation) "
                   "stay unshrunk")
    p.add_argument("--alloc-floor", type=float, default=0.0, metavar="F",
                   help="--alloc global only: every matrix keeps at least F x the rank uniform would give it, in [0, 1] "
                   "(default 0: no floor); the greedy shares out the rest. No extra cost; measured: no gain on Gemma 3 at "
                   "--ratio 0.6, the one case where global loses to uniform (docs/RESULTS.md)")
    p.add_argument("--max-loss", type=float, default=None, metavar="F",
                   help="a quality target instead of --ratio: the smallest model (on the global allocator's path) whose "
                   "predicted relative loss is at most F: the sensitivity-weighted truncation loss over the weighted total "
                   "of every matrix's whitened spectrum, in [0, 1) (needs a profile, like --alloc global)")
    p.add_argument("--max-ppl-increase", type=float, default=None, metavar="F",
                   help="a quality target instead of --ratio (which it replaces: give one of them): the smallest model on "
                   "the global allocator's path whose predicted perplexity on held-out windows is at most (1 + F) x the "
                   "original's, F > 0 (0.25: +25%%). Predicted from the profile's spectra and sensitivity weights (second "
                   "order); the report and the summary also give the measured figure, and a warning if it misses the "
                   "target. Costs the --heldout-samples windows: one extra forward of them per block in the profile and "
                   "in the run, and that many more rows in each activation file (no extra pass over the model). Needs "
                   "a profile holding the original's held-out perplexity: --profile made with `streamsvd profile "
                   "--heldout-samples H`, or the run profiles for itself first. With --max-loss too: the smallest model "
                   "that meets both")
    p.add_argument("--heldout-samples", type=int, default=None, metavar="H",
                   help="with --max-ppl-increase: windows of --seqlen tokens drawn from the calibration text, sharing no "
                   "token with the calibration windows, kept out of every statistic, on which perplexity is predicted "
                   "and measured (default 8: 4,096 tokens at --seqlen 512 for 1/8 of the default calibration's cost)")
    p.add_argument("--profile", default=None, metavar="DIR",
                   help="a `streamsvd profile` folder made with the same model and calibration flags: allocate from it "
                   "without profiling again")
    p.add_argument("--profile-samples", type=int, default=None, metavar="N",
                   help=PROFILE_SAMPLES_HELP + " of the profile the run makes for itself (not with --profile)")


PROFILE_SAMPLES_HELP = (
    "windows of the statistics pass (every linear's spectrum), the first N calibration windows (default 16; more than "
    "--calib-samples: all of them), at least the sensitivity pass's (8 by default). Each window costs one block forward "
    "per block in the profile; measured at 64 x 512 on SmolLM2 and Gemma 3: 16 gave the held-out perplexity of all 64 (within 1.1%% in "
    "the calibration's domain, +-6%% across) for 28-38%% less profiling time, 11-13%% of the job's (docs/RESULTS.md)")


def _add_quality_flags(p) -> None:
    from .job.defaults import DEFAULT_ANCHOR, DEFAULT_REFINE_LR, DEFAULT_REFINE_STEPS

    p.add_argument("--calibrate", choices=["sequential", "block"], default=None,
                   help="sequential: each input group (q/k/v, o, gate/up, down) is calibrated on the inputs the block's "
                   "already-compressed groups give it; costs about 1.75 block forwards per batch instead of one. block: all "
                   "groups at once on the block's inputs (default: sequential with --compensate, else block)")
    p.add_argument("--compensate", action=argparse.BooleanOptionalAction, default=None,
                   help="fit each compressed linear to the original model's outputs, correcting the error of the blocks "
                   "before it (closed form, docs/DESIGN.md; a linear wider than 16384 inputs, a 70B down_proj, is not). Costs a second "
                   "activation stream (twice the work files on disk), the original block beside the compressed one in "
                   "memory, one more in x in matrix per input (out x in for down_proj), one more block forward per batch: "
                   "about 3x the compression time of --no-compensate on SmolLM2, for 3-53%% lower held-out perplexity in "
                   "the calibration's domain and 9-74%% lower across domains at ratio 0.4 on SmolLM2 and Gemma 3, the least "
                   "on top of --alloc global (docs/RESULTS.md). Default: on with --method eig and --propagate compressed")
    p.add_argument("--anchor", type=float, default=None,
                   help="pull each factored weight toward the original: adds anchor x (the Gram's mean diagonal) x "
                   "||W - W'||^2 to the loss, so the fit does not follow the calibration text too closely; 0 turns it off "
                   f"(default {DEFAULT_ANCHOR} with --compensate, else 0; measured: without it compensation over-fits the "
                   "calibration text); no extra cost")
    p.add_argument("--refine-steps", type=int, default=DEFAULT_REFINE_STEPS,
                   help="after a block is factored, tune its factors (only them) with this many Adam steps so the block's "
                   "output matches the original block's; an eighth of the windows is held out and decides early stopping, "
                   "so a fit that does not generalise changes nothing. Costs a forward and a backward of the block per "
                   f"step (time per block in the summary) and the optimiser state in memory; 0 turns it off (default {DEFAULT_REFINE_STEPS}; "
                   "measured at 0.4 on SmolLM2 and Gemma 3, 40 steps: on top of compensation -0.8%% to +6%% held-out "
                   "perplexity in domain and -0.7%% to +15%% across for 2-7x the compression time; on plain uniform "
                   "truncation 20-28%% lower in domain, still above the compensated default across domains, docs/RESULTS.md)")
    p.add_argument("--refine-lr", type=float, default=None, help=f"Adam step size for --refine-steps (default {DEFAULT_REFINE_LR})")


def _add_calibration_flags(p) -> None:
    """The budget and calibration flags `plan` and `profile` take as `run` does."""
    p.add_argument("--max-mem", default=None, help="memory budget as for run, e.g. 24G (default: 75%% of available RAM)")
    p.add_argument("--calib", action="append", default=[], metavar="FILE", help="as for run")
    p.add_argument("--calib-samples", type=int, default=64, help="as for run (default 64)")
    p.add_argument("--seqlen", type=int, default=512, help="as for run (default 512)")
    p.add_argument("--seed", type=_seed, default=0, help="as for run (default 0)")


def _add_profile(sub) -> None:
    p = sub.add_parser(
        "profile", help="measure what rank allocation needs, once, for any number of runs",
        description="Stream MODEL_DIR once with the original model's activations and save in PROFILE_DIR every "
        "linear's whitened spectrum (the truncation loss at every rank) and its sensitivity (the mean squared "
        "gradient of the LM loss at its output, from one streamed backward pass over a few windows). "
        "`streamsvd run --profile PROFILE_DIR` with the same calibration flags allocates ranks from it.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face checkpoint: config.json, safetensors, tokenizer")
    p.add_argument("profile_dir", metavar="PROFILE_DIR", help="new directory for the profile")
    _add_calibration_flags(p)
    p.add_argument("--act-dtype", choices=["float32", "float16", "bfloat16"], default="float32", help="as for run")
    p.add_argument("--sensitivity-samples", type=int, default=8, metavar="N",
                   help="windows of the backward pass for the sensitivity weights, the first N calibration windows, 0 "
                   "to 16 (default 8, as `run`'s own profile: measured as good as 16 on SmolLM2 and Gemma 3 for 40-94 s "
                   "less, docs/RESULTS.md; 0: none, "
                   "every matrix weighs the same). A folder holding a profile of another count is profiled again")
    p.add_argument("--profile-samples", type=int, default=None, metavar="N", help=PROFILE_SAMPLES_HELP)
    p.add_argument("--heldout-samples", type=int, default=0, metavar="H",
                   help="also measure the original model's perplexity on H windows that share no token with the "
                   "calibration windows and enter no statistic: what `run --max-ppl-increase --heldout-samples H` "
                   "needs from a profile (default 0: none; run's default is 8). Costs one more forward of H windows")
    p.add_argument("--work-dir", default=None, metavar="DIR", help="where the activation files go (default: inside PROFILE_DIR)")
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="as for run: cpu (default) or cuda / cuda:N. On a GPU: the statistics pass, the sensitivity "
                   "pass's forward and backward through the blocks, and each linear's spectrum (its eigh or SVD); the "
                   "head's gradient and the activation files stay on the host")
    p.add_argument("--max-gpu-mem", default=None, metavar="SIZE", help="as for run, with --device cuda")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="windows per batch (default: as for `run`, about 2,048 tokens' worth on the CPU, or fewer if --max-mem "
                   "needs). Under torchrun (`torchrun "
                   "--nproc-per-node N -m streamsvd profile ...`) each process streams its share of the windows; the "
                   "profile is the one-process profile with the same batch size, byte for byte")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


SVD_HELP = ("SVD of each whitened weight: exact (LAPACK, O(m n min(m, n))), randomized (Halko-Martinsson-Tropp, "
            "O(m n (rank + 10) 5), leading singular values only; measured 0.5-1.6%% more truncation loss than exact on SmolLM2), or "
            "auto (default: randomized only for the shapes where tools/bench_svd.py measured it within 1%% of exact "
            "and faster; docs/RESULTS.md)")


QUANT_HELP = ("store every factor quantised to 8 or 4 bits, per group of --group-size input columns, in "
              "compressed-tensors' pack-quantized layout (docs/DESIGN.md): int8 about 1/2, int4 about 1/4 of the "
              "16-bit factor bytes (1/4 and 1/8 of float32), at some output error (docs/RESULTS.md); the later blocks "
              "are calibrated on the quantised blocks' outputs. Costs a few seconds of rounding per block; "
              "streamsvd.load dequantises to the load dtype (default: full precision, no quantisation)")
GROUP_HELP = ("input columns sharing one scale with --quant (default 128; the last group of a row may be shorter). "
              "Smaller groups: lower error, one more 16-bit scale per group (2/G bytes per number)")


ROUNDING_HELP = ("with --quant: gptq (default) rounds each factor column by column, feeding the rounding error "
                 "forward through the inverse of the Gram of that factor's input (GPTQ), for a lower output error "
                 "(docs/RESULTS.md); costs one in x in Cholesky per linear and a column loop (seconds per block), "
                 "and holds each input Gram until its linears are quantised. rtn: round to nearest "
                 "(what `streamsvd quantize` does, and `run` after --refine-steps; a linear factored on its output "
                 "side is always rounded so)")


def _add_quant_flags(p, quant_default=None, rounding=True, quant_help=QUANT_HELP) -> None:
    # Plain strings, so an unknown value ends with the usual error/fix lines (job/pipeline.py check_quant_flags).
    p.add_argument("--quant", default=quant_default, metavar="int8|int4", help=quant_help)
    p.add_argument("--group-size", type=int, default=None, metavar="G", help=GROUP_HELP)
    if rounding:
        p.add_argument("--quant-rounding", default=None, metavar="gptq|rtn", help=ROUNDING_HELP)


PRECISION_HELP = ("arithmetic of the factorisation's eigendecompositions and products (eig's exact routes; the "
                  "whitening stays float64): float64 (default) or float32, about twice as fast for those on a CPU "
                  "(factorisation is most of a 7B or 70B block's time). A linear's float32 factors are kept only where "
                  "their loss is predicted within 0.1%% of float64's (else that linear is factored again in float64, "
                  "costing the float32 attempt's time); docs/RESULTS.md measures both. Error compensation's "
                  "pseudo-inverse stays float64")


def _add_svd_flag(p) -> None:
    from .job.device import DEVICE_HELP, MAX_GPU_MEM_HELP

    p.add_argument("--svd", choices=["exact", "randomized", "auto"], default="auto", help=SVD_HELP)
    p.add_argument("--precision", choices=["float64", "float32"], default="float64", help=PRECISION_HELP)
    p.add_argument("--device", default="cpu", metavar="DEVICE", help=DEVICE_HELP)
    p.add_argument("--max-gpu-mem", default=None, metavar="SIZE", help=MAX_GPU_MEM_HELP)


def _add_plan(sub) -> None:
    p = sub.add_parser(
        "plan", help="memory, disk and time plan of a `run` (reads no weights)",
        description="Print what `streamsvd run` with the same flags would use: the peak memory of each stage, the "
        "batch size, the factorisation route of each matrix type, the disk space and an estimated time. Reads "
        "only the checkpoint's headers, config and tokenizer and the calibration text, and times a few small "
        "matrix products (about a second) for the estimate. Takes every flag of `run` (so a run command can be "
        "planned as typed, OUT_DIR left out); --restart, --no-progress, --shrink and --work-dir change nothing in "
        "a plan. With --alloc global (the default) and no --profile the plan includes the profile such a job runs "
        "first, as its `profile` stage; --alloc uniform plans none, so its smallest --max-mem can be lower. A "
        "--max-mem below the smallest workable budget is refused after the plan is printed, as `run` refuses it "
        "(exit status 2); one beyond this machine's RAM is planned (for another machine) with status 0.",
    )
    p.add_argument("model_dir", metavar="MODEL_DIR", help="Hugging Face checkpoint: config.json, safetensors, tokenizer")
    _add_job_flags(p)
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="plan one process of a `torchrun --nproc-per-node N -m streamsvd run` job: its share of the "
                   "windows, its memory under --max-mem (per process) and its work files (default 1)")
    p.add_argument("--json", action="store_true", help="print the plan as one JSON object (min_max_mem_bytes, "
                   "peak_bytes, disk_bytes, seconds_estimate, and every stage's parts)")


def _add_verify(sub) -> None:
    p = sub.add_parser("verify", help="check a streamsvd OUT_DIR against the checksums recorded as it was written",
                       description="Check every file the job recorded (size, safetensors header, sha256 of the "
                       "contents). Reads the whole output once (about 1 GB/s per core). Exit 0 if the job finished and every file "
                       "is intact, 2 if a file is damaged or missing or the job is unfinished (its files are checked "
                       "all the same).")
    p.add_argument("out_dir", metavar="OUT_DIR", help="a streamsvd output directory (finished or not)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity of a checkpoint or streamsvd output",
                       description="Perplexity over non-overlapping windows of --text, for an original checkpoint "
                       "or a streamsvd OUT_DIR. The model is streamed one decoder block at a time under --max-mem, "
                       "so a model larger than RAM can be evaluated.")
    p.add_argument("model", metavar="MODEL_OR_OUT", help="checkpoint directory or streamsvd OUT_DIR")
    p.add_argument("--text", action="append", required=True, metavar="FILE", help="evaluation text (plain or .jsonl); repeatable")
    p.add_argument("--seqlen", type=int, default=512, help="tokens per window (default 512)")
    p.add_argument("--max-windows", type=int, default=None, help="score at most this many windows (default: all)")
    p.add_argument("--max-mem", default=None, help="memory budget, e.g. 8G; the windows' hidden states go to disk when "
                   "they would take over a quarter of it (default: 75%% of available RAM)")
    p.add_argument("--work-dir", default=None, metavar="DIR", help="where on-disk hidden states go when they do "
                   "(two files of windows x seqlen x hidden float32, in a folder streamsvd-eval-XXXX removed at the end, or by "
                   "the next eval if this one is killed; default: the system's temporary folder)")
    p.add_argument("--in-memory", action="store_true", help="load the whole model instead of streaming it (needs "
                   "RAM for all of it; same figure)")
    p.add_argument("--json", action="store_true", help="print the result as one JSON line")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of a streamsvd OUT_DIR's files against what its job recorded (what `streamsvd "
                   "verify` does: one read of the output, about 1 GB/s per core; sizes and headers are checked either way)")
    p.add_argument("--batch-size", type=int, default=None, metavar="B",
                   help="windows per block forward when streaming (default: about 2,048 tokens' worth on the CPU, which "
                   "measured fastest, or fewer if --max-mem needs; on a GPU the most that fit). Under "
                   "torchrun (`torchrun --nproc-per-node N -m streamsvd eval ...`) each process streams its share of "
                   "the windows; the perplexity is the one-process figure with the same batch size, exactly")
    p.add_argument("--device", default="cpu", metavar="DEVICE",
                   help="where the blocks' forwards run: cpu (default) or cuda / cuda:N (under torchrun, cuda is each "
                   "process's own GPU). On a GPU each block and each batch of hidden states go there, and the final norm "
                   "and head too where the head's float32 weight fits --max-gpu-mem; the hidden states stay on the host. "
                   "Needs a CUDA build of torch")
    p.add_argument("--max-gpu-mem", default=None, metavar="SIZE",
                   help="GPU memory budget with --device cuda, e.g. 8G (default: 90%% of the GPU's free memory); sets the "
                   "batch with --max-mem, and torch's allocator is held to it")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _add_import(sub) -> None:
    p = sub.add_parser("import-gguf", help="turn a GGUF file into a safetensors checkpoint",
                       description="Dequantise a GGUF model file to an ordinary Hugging Face safetensors checkpoint "
                       "that `streamsvd run` reads.")
    p.add_argument("gguf", metavar="GGUF", help="the .gguf file")
    p.add_argument("out_dir", metavar="OUT_DIR", help="new directory for the checkpoint")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weight dtype (default float32)")


def _add_export(sub) -> None:
    p = sub.add_parser("export", help="write a finished OUT_DIR in another format (dense: an ordinary checkpoint; "
                       "onnx: an onnxruntime decoder with its KV cache)",
                       description="dense: multiply every compressed linear's factors back into one weight and write "
                       "an ordinary checkpoint of the base family (plain config.json, safetensors shards written one "
                       "block at a time, tokenizer files copied) for tools that take only dense weights (vLLM, "
                       "llama.cpp's converters). Costs the size back: DIR is as large as the uncompressed model's "
                       "weights (the command prints both sizes), and one pass over OUT_DIR. A stopped dense export is finished by the "
                       "same command (the shards it wrote are kept). "
                       "onnx: model.onnx (+ model.onnx.data above 1 GiB of weights) for onnxruntime, with the KV cache as "
                       "inputs (past_key_values.N.key/value) and outputs (present.N.key/value), each factor pair as two "
                       "MatMuls (pivoted: Transpose, Gather, MatMul, Add, MatMul), float32; config.json and the tokenizer files beside "
                       "it. The export is checked: onnxruntime runs a prefill, a cached decode step and a left-padded batch's decode step past "
                       "the sliding window, and a float32 "
                       "graph whose logits differ from PyTorch's by over 1e-3 of the largest logit is refused. Needs `pip install 'streamsvd[onnx]'`. "
                       "Costs about 6x the float32 model's bytes in RAM and 2.5 CPU-minutes for SmolLM2-135M (2.2 GB peak).")
    p.add_argument("format", metavar="FORMAT", choices=sorted(EXPORTS), help=f"one of: {', '.join(sorted(EXPORTS))}")
    p.add_argument("out_dir", metavar="OUT_DIR", help="a finished streamsvd output")
    p.add_argument("dir", metavar="DIR", help="new or empty directory for the export (onnx: an earlier ONNX export there is overwritten; dense: a "
                   "stopped export of the same OUT_DIR there is finished)")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of a streamsvd OUT_DIR's files against what its job recorded (what `streamsvd "
                   "verify` does: one read of the output, about 1 GB/s per core; sizes and headers are checked either way)")
    p.add_argument("--onnx-int4", action="store_true",
                   help="onnx: quantise the decoder blocks' MatMuls (the factors, and any linear kept dense) to 4-bit "
                   "MatMulNBits with onnxruntime's own quantiser (round-to-nearest, asymmetric, per block of inputs); "
                   "embeddings and head stay float32; pivoted factors are first re-factored as balanced plain factors of the "
                   "same rank (r^2 more numbers per linear), which survive rounding far better. About 1/6 of the float32 "
                   "bytes for those weights and about twice the export time (328 vs 155 CPU-s on SmolLM2), at a cost in "
                   "accuracy: the check reports how far the logits move; measure perplexity before relying on it")
    p.add_argument("--onnx-block-size", type=int, default=None, metavar="N",
                   help="onnx: inputs per quantisation block with --onnx-int4 (16, 32, 64 or 128; default 32; larger "
                   "is smaller and less accurate)")
    p.add_argument("--onnx-pivoted", choices=["rows", "columns", "folded"], default=None,
                   help="onnx: how a pivoted factor pair enters the graph (float32 exports). rows (default): the "
                   "activations transposed so the pivots gather whole rows; the fastest for prompts, no extra bytes. "
                   "columns: gathers on the last axis as PyTorch does; two nodes fewer per linear, a few percent faster "
                   "single-sequence decoding, a quarter to a third slower prompts in onnxruntime. folded: plain factors [I | B'] P^T "
                   "and A', no gathers; fastest overall on SmolLM2 but r^2 more numbers per linear (+11%% bytes at "
                   "ratio 0.4); docs/RESULTS.md, 'Inference speed'")
    p.add_argument("--no-check", action="store_true",
                   help="onnx: skip the onnxruntime check against PyTorch (saves one model's worth of RAM and a few seconds)")


def _seed(value: str) -> int:
    """A seed torch's generator takes (a larger one was a ValueError traceback)."""
    seed = int(value)
    if abs(seed) >= 1 << 62:  # with room for the held-out windows' offset (io/calibration.py)
        raise argparse.ArgumentTypeError(f"{value} is out of range (|seed| < 2^62)")
    return seed


class _Parser(argparse.ArgumentParser):
    """argparse's refusals as every other refusal: one `error:` line and one `fix:` line, exit status 2."""

    def error(self, message: str):
        self.exit(2, f"error: {self.prog}: {message}\n  fix: see `{self.prog} --help` for what each flag takes "
                     "(a negative number goes as --flag=-1)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamsvd", description="Streaming truncated-SVD compression of decoder LLMs "
                                     "under a memory budget.", epilog=EPILOG)
    from . import __version__

    parser.add_argument("--version", action="version", version=f"streamsvd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_run(sub)
    _add_profile(sub)
    _add_plan(sub)
    _add_eval(sub)
    _add_import(sub)
    _add_verify(sub)
    _add_export(sub)
    _add_quantize(sub)
    return parser


def _ram_if_exceeded(max_mem: str | None) -> int | None:
    """This machine's RAM in bytes when --max-mem asks for more, else None."""
    import psutil

    from .job.memory import parse_size

    total = psutil.virtual_memory().total
    return total if max_mem and parse_size(max_mem) > total else None


def _refuse_budget_beyond_ram(max_mem: str | None) -> None:
    """A --max-mem beyond this machine's RAM sizes batches for memory that is not there (a typo such as 240G for
    24G ends in the OOM killer, or swap); `plan` still takes it, to plan for another machine."""
    from .job.memory import format_size

    total = _ram_if_exceeded(max_mem)
    if total is not None:
        raise StreamSVDError(f"--max-mem {max_mem} is more than this machine's {format_size(total)} of RAM",
                             f"give at most {format_size(total)}, or leave --max-mem out (75% of the available RAM); "
                             "`streamsvd plan` takes any budget, to plan for another machine")


def _job_config(args, out_dir: Path):
    """The JobConfig of `run`'s flags (`plan` takes the same), with the refusals of settings that contradict."""
    from .job.memory import parse_size
    from .job.pipeline import JobConfig

    if args.ratio is not None and args.max_ppl_increase is not None:
        raise StreamSVDError("--ratio and --max-ppl-increase both set the model's size",
                             "give one of them: --ratio for a size, --max-ppl-increase for a quality target")
    if args.ratio is not None and args.max_loss is not None:  # the ratio was ignored (and recorded as if it held)
        raise StreamSVDError("--ratio and --max-loss both set the model's size",
                             "give one of them: --ratio for a size, --max-loss for a quality target")
    if args.refine_lr is not None and not args.refine_steps:  # the step size of no steps: silently nothing
        raise StreamSVDError("--refine-lr sets the step size of --refine-steps, which is 0",
                             "add --refine-steps N (e.g. 40), or drop --refine-lr")
    target = "--max-loss" if args.max_loss is not None else "--max-ppl-increase" if args.max_ppl_increase is not None else None
    if target and args.alloc == "uniform":  # a quality target takes the global allocator's path: uniform was ignored
        raise StreamSVDError(f"{target} follows the global allocator's order, not uniform's",
                             "use --alloc global (or leave --alloc out)")
    cfg = JobConfig(
        model_dir=Path(args.model_dir), out_dir=out_dir, ratio=0.4 if args.ratio is None else args.ratio,
        max_mem=parse_size(args.max_mem) if args.max_mem else None, calib=args.calib,
        calib_samples=args.calib_samples, seqlen=args.seqlen, seed=args.seed, method=args.method,
        propagate=args.propagate, act_dtype=args.act_dtype, progress=not args.no_progress,
        work_dir=Path(args.work_dir) if args.work_dir else None, restart=args.restart, svd=args.svd,
        precision=args.precision, device=args.device,
        max_gpu_mem=parse_size(args.max_gpu_mem) if args.max_gpu_mem else None,
    )
    cfg.factors = args.factors
    cfg.calibrate, cfg.compensate, cfg.anchor = args.calibrate, args.compensate, args.anchor
    cfg.refine_steps = args.refine_steps
    if args.refine_lr is not None:
        cfg.refine_lr = args.refine_lr
    cfg.alloc, cfg.rank_multiple, cfg.alloc_floor = args.alloc, args.rank_multiple, args.alloc_floor
    cfg.plots = not args.no_plots
    cfg.shrink = args.shrink
    cfg.profile = Path(args.profile) if args.profile else None
    cfg.profile_samples = args.profile_samples
    cfg.max_loss = args.max_loss
    cfg.max_ppl_increase, cfg.heldout_samples = args.max_ppl_increase, args.heldout_samples
    cfg.quant, cfg.group_size, cfg.quant_rounding = args.quant, args.group_size, args.quant_rounding
    cfg.batch_size = args.batch_size
    return cfg


def _check_alloc_floor(cfg) -> None:
    if cfg.alloc_floor and cfg.alloc not in (None, "global"):  # None: the default, global
        raise StreamSVDError(f"--alloc-floor applies to --alloc global, not to --alloc {cfg.alloc}",
                             "drop --alloc-floor, or use --alloc global")


def cmd_run(args) -> int:
    from .job.pipeline import run_job
    from .job.state import read_state

    _refuse_budget_beyond_ram(args.max_mem)
    cfg = _job_config(args, Path(args.out_dir))
    state = read_state(cfg.out_dir, strict=False) if cfg.out_dir.is_dir() and not args.restart else None
    if cfg.alloc is None and state is not None and state.settings:
        # --alloc left out, resuming: the job's own allocation (a job started before `global` became the default
        # was `uniform`, recorded as no "alloc" key), rather than refusing it as another job
        cfg.alloc = state.settings.get("alloc", "uniform")
        if cfg.alloc != "global":
            print(f"streamsvd: resuming {args.out_dir} with the allocation it was started with: --alloc {cfg.alloc}",
                  file=sys.stderr)
    if (args.profile_samples is None and not args.profile and state is not None and (state.settings or {}).get("profile") == "own"
            and cfg.needs_profile):  # a resume that asks for no profile (--alloc uniform) is another job: refused as one
        # --profile-samples left out, resuming a job that profiled for itself: its profile's windows (a job started
        # before the flag took all of them, recorded as no key), rather than refusing it as another job
        recorded = state.settings.get("profile_samples")
        cfg.profile_samples = cfg.calib_samples if recorded is None else recorded
        from .job.profile import DEFAULT_PROFILE_SAMPLES

        if min(cfg.profile_samples, cfg.calib_samples) != min(DEFAULT_PROFILE_SAMPLES, cfg.calib_samples):
            print(f"streamsvd: resuming {args.out_dir} with the profile it was started with: --profile-samples "
                  f"{cfg.profile_samples}", file=sys.stderr)
    _check_alloc_floor(cfg)
    from .io.calibration import DEFAULT_WARNING
    from .job.distributed import World

    world = World.current()
    cfg.progress = cfg.progress and world.writes  # one set of bars and one summary: rank 0's
    report = run_job(cfg)
    if not world.writes:
        return 0
    if not args.calib:  # once the job has succeeded: a refused input gets its one error and fix line alone
        print(DEFAULT_WARNING, file=sys.stderr)
    finished_before = state is not None and state.complete and not report.get("repaired")
    print(
        f"{'already complete, nothing to do' if finished_before else 'done'}: {args.out_dir}\n"
        f"  compressed linears: ratio {report['ratio_linear']:.3f} "
        f"({report['linear_params_before']:,} -> {report['linear_params_after']:,} parameters)\n"
        f"  whole model:        ratio {report['ratio_model']:.3f} "
        f"({report['model_params_before']:,} -> {report['model_params_after']:,} parameters)\n"
        f"{_bytes_line(report)}"
        f"{_allocation_line(report)}"
        f"  calibration:        {_calibration_line(report)}\n"
        f"  {'that' if finished_before else 'this'} run: {_run_figures(report.get('this_run') or {})}\n"
        f"  report: {Path(args.out_dir) / 'streamsvd_report.md'}"
    )
    from .io.output import perplexity_target_lines

    for line in perplexity_target_lines(report.get("allocation") or {}):
        if line.startswith("warning:"):
            print(line, file=sys.stderr)
    return 0


def _calibration_line(report: dict) -> str:
    c = report["calibration"]
    return f"{c['samples']} windows x {c['seqlen']} tokens of {c['source']} (seed {c['seed']}); the model fits this text best"


def _bytes_line(report: dict) -> str:
    if "linear_bytes_before" not in report:
        return ""
    from .job.memory import format_size

    q = report.get("quantization")
    how = f", factors int{q['num_bits']} in groups of {q['group_size']}" if q else ""
    return (f"  decoder linears:    {format_size(report['linear_bytes_before'])} -> {format_size(report['linear_bytes_after'])} "
            f"on disk ({1 - report['bytes_ratio_linear']:.3f} of the bytes{how})\n")


def _add_quantize(sub) -> None:
    p = sub.add_parser(
        "quantize", help="quantise the factors of a finished OUT_DIR into NEW_DIR",
        description="Write NEW_DIR: OUT_DIR with every compressed linear's factors quantised per group (the same "
        "rounding as `run --quant`; one block shard in memory at a time), every other file copied, and a "
        "`quantization` entry in config.json's streamsvd section. It rounds to nearest (it has no calibration "
        "statistics), which on pivoted factors adds several times the output error of `run --quant`'s GPTQ "
        "rounding (SmolLM2, ratio 0.4: held-out perplexity 115.6 -> 117.1 at int8, -> 11,882 at int4; "
        "docs/RESULTS.md): int8 is the default here; for int4 use `run --quant int4`.",
    )
    p.add_argument("out_dir", metavar="OUT_DIR", help="a finished streamsvd output (not quantised)")
    p.add_argument("new_dir", metavar="NEW_DIR", help="new or empty directory")
    p.add_argument("--no-verify", action="store_true", help="skip the sha256 check of a streamsvd OUT_DIR's files against what its job recorded (what `streamsvd "
                   "verify` does: one read of the output, about 1 GB/s per core; sizes and headers are checked either way)")
    _add_quant_flags(p, quant_default="int8", rounding=False, quant_help=(
        "int8 (default; about 1/2 of the 16-bit factor bytes) or int4 (about 1/4; see the warning above), rounded to "
        "nearest per group in compressed-tensors' pack-quantized layout; a few seconds per shard"))


def cmd_quantize(args) -> int:
    from .job.quantize_output import quantize_output

    report = quantize_output(Path(args.out_dir), Path(args.new_dir), args.quant, args.group_size,
                             verify=not args.no_verify)
    print(f"done: {args.new_dir}\n{_bytes_line(report)}", end="")
    if args.quant == "int4":
        print("warning: round-to-nearest int4 loses much more than `run --quant int4` (GPTQ with the calibration "
              "statistics); on SmolLM2 at ratio 0.4 it raised held-out perplexity from 115.6 to 11,882 (docs/RESULTS.md). "
              "Check the result with `streamsvd eval` before using it.", file=sys.stderr)
    return 0


def _allocation_line(report: dict) -> str:
    alloc = report.get("allocation")
    if not alloc:
        return ""
    prof = alloc["profile"]
    run = report.get("this_run") or {}
    cost = ("" if "profile_seconds" not in run else
            f", cost {run['profile_seconds']:.1f} s (sensitivity {run.get('profile_sensitivity_seconds') or 0:.1f} s)")
    target = "" if alloc.get("max_loss") is None else f"--max-loss {alloc['max_loss']}, "
    if alloc.get("max_ppl_increase") is not None:
        target = f"--max-ppl-increase {alloc['max_ppl_increase']}, " + target
    from .io.output import perplexity_target_lines

    ppl = "".join(f"  {line}\n" for line in perplexity_target_lines(alloc) if not line.startswith("warning:"))
    return (f"  allocation:         {target}{alloc['alloc']}, rank multiple {alloc['rank_multiple']}, "
            f"predicted relative loss {alloc['relative_loss']:.4f}; "
            f"{prof['profiling']}: {prof['dir']}{cost}\n{ppl}")


def cmd_profile(args) -> int:
    from .job.memory import parse_size
    from .job.profile import ProfileConfig, make_profile

    _refuse_budget_beyond_ram(args.max_mem)
    cfg = ProfileConfig(
        model_dir=Path(args.model_dir), profile_dir=Path(args.profile_dir),
        max_mem=parse_size(args.max_mem) if args.max_mem else None, calib=args.calib,
        calib_samples=args.calib_samples, seqlen=args.seqlen, seed=args.seed, act_dtype=args.act_dtype,
        sensitivity_samples=args.sensitivity_samples, work_dir=Path(args.work_dir) if args.work_dir else None,
        progress=not args.no_progress, heldout_samples=args.heldout_samples, batch_size=args.batch_size,
        **({} if args.profile_samples is None else {"profile_samples": args.profile_samples}),
        device=args.device, max_gpu_mem=parse_size(args.max_gpu_mem) if args.max_gpu_mem else None,
    )
    from .job.distributed import World

    world = World.current()
    cfg.progress = cfg.progress and world.writes  # one set of bars and one summary: rank 0's
    profile = make_profile(cfg)
    if not world.writes:
        return 0
    meta = profile.meta
    timing = profile.timing
    sens = (f"sensitivity from {meta['sensitivity_samples']} windows in {timing.get('sensitivity_seconds') or 0:.1f} s"
            if meta["sensitivity"] else "no sensitivity (every weight 1)")
    windows = profile.statistics_samples
    print(f"profile: {args.profile_dir}\n  {len(meta['order'])} matrices, {meta['tokens']:,} calibration tokens "
          f"({windows} window{'s' if windows != 1 else ''}), "
          f"{timing.get('seconds', 0):.1f} s{' (made earlier: reused)' if profile.reused else ''}; {sens}\n"
          f"  digest {profile.digest}")
    return 0


def _run_figures(run: dict) -> str:
    from .job.memory import format_size

    if not run:
        return "no figures recorded"
    figures = f"{run['seconds']:.1f} s, peak RSS {format_size(run['peak_rss_bytes'])}, batch {run['batch_size']}"
    if run.get("cpu_seconds") is not None and run.get("threads") and run["seconds"] > 0:  # absent in older run logs
        figures += f", {run['cpu_seconds'] / run['seconds']:.1f} of {run['threads']} CPU threads busy on average"
    if run.get("max_mem_bytes"):
        figures += (f" (measured peak / budget {format_size(run['peak_rss_bytes'])} / {format_size(run['max_mem_bytes'])}"
                    f" = {run['peak_rss_bytes'] / run['max_mem_bytes']:.2f}; planned {format_size(run['planned_peak_bytes'])})")
    return figures


def cmd_plan(args) -> int:
    from .job.plan import plan_job

    cfg = _job_config(args, Path("."))
    cfg.progress = False
    _check_alloc_floor(cfg)
    if args.nproc < 1:
        raise StreamSVDError(f"--nproc {args.nproc} is not positive", "give the number of processes torchrun starts, 1 or more")
    plan = plan_job(cfg, processes=args.nproc)
    refusals = _plan_refusals(plan, args.max_mem, args.batch_size)
    if args.json:
        print(json.dumps({**plan.to_json(), "run_refuses": refusals}))
    else:
        print(plan.describe())
        for reason in refusals:
            print(f"{reason}; `run` would refuse it")
    # A budget below the smallest workable one is refused as `run` refuses it (one error and its fix, exit status 2),
    # after the plan that shows why; a --max-mem beyond this machine's RAM is planned for another machine (status 0).
    from .job.plan import refuse_if_too_small

    sys.stdout.flush()
    refuse_if_too_small(plan)
    return 0


def _plan_refusals(plan, max_mem: str | None, batch_size: int | None = None) -> list[str]:
    """Why `run` with these settings would refuse on this machine (empty: it would start); `plan --json` carries
    them as `run_refuses`, so a script need not compare the budgets itself."""
    reasons = []
    if plan.budget_bytes < plan.strict_min_bytes:
        reasons.append("this budget is below the smallest workable one")
    elif batch_size and plan.peak_bytes > plan.budget_bytes:  # job/pipeline.py _batch_size's refusal of a fixed batch
        reasons.append("this --batch-size needs more than --max-mem")
    if not plan.gpu_fits():
        reasons.append("this --max-gpu-mem is below the GPU's planned peak")
    if _ram_if_exceeded(max_mem) is not None:  # the same test as _refuse_budget_beyond_ram's
        reasons.append("this --max-mem is more than this machine's RAM (fine for planning another machine)")
    return reasons


def cmd_eval(args) -> int:
    from .io.calibration import load_texts, load_tokenizer
    from .io.fsutil import within
    from .job.memory import parse_size

    if args.seqlen < 2:
        raise StreamSVDError(f"--seqlen {args.seqlen} is too short", "use at least 2 tokens per window")
    if args.max_windows is not None and args.max_windows < 1:
        raise StreamSVDError(f"--max-windows {args.max_windows} is not positive", "use at least 1, or leave it out")
    max_mem = parse_size(args.max_mem) if args.max_mem else None
    if max_mem is not None and max_mem <= 0:
        raise StreamSVDError(f"--max-mem {args.max_mem} is not a positive size", "give a budget such as 8G")
    if args.work_dir and not Path(args.work_dir).is_dir():
        raise StreamSVDError(f"--work-dir {args.work_dir} is not a directory", "give an existing directory, or leave it out")
    if args.work_dir and Path(args.model).is_dir() and within(args.work_dir, args.model):
        # a killed eval's hidden states were left there: `verify` passed them, `quantize` copied them into NEW_DIR
        raise StreamSVDError(f"--work-dir {args.work_dir} is the model being evaluated or inside it",
                             "give a directory outside it, or leave --work-dir out (the system's temporary folder)")
    streamed_only = [flag for flag, given in (("--max-mem", args.max_mem), ("--work-dir", args.work_dir),
                                              ("--batch-size", args.batch_size)) if given is not None]
    if args.in_memory and streamed_only:  # the whole model is loaded: they would be silently ignored
        raise StreamSVDError(f"{', '.join(streamed_only)} appl{'y' if len(streamed_only) > 1 else 'ies'} to the "
                             "streamed evaluation, not to --in-memory",
                             "drop --in-memory (the streamed evaluation keeps to --max-mem), or drop "
                             f"{', '.join(streamed_only)}")
    _refuse_budget_beyond_ram(args.max_mem)
    from .job.device import check_device_flags

    max_gpu_mem = parse_size(args.max_gpu_mem) if args.max_gpu_mem else None
    check_device_flags(args.device, max_gpu_mem)
    if args.in_memory:
        from .job.launcher import launched_distributed

        if launched_distributed():
            raise StreamSVDError("--in-memory cannot run under torchrun", "drop --in-memory (the streamed evaluation splits "
                                 "over the processes), or run it as one process")
        from .job.evaluate import perplexity
        from .model.loading import load
        from .job.device import gpu_budget, hold_to_budget, peak_bytes, resolve_device

        device = resolve_device(args.device)  # refused before the model is read where torch sees no such GPU
        gpu_bytes = gpu_budget(device, max_gpu_mem) if device.type == "cuda" else None
        if device.type == "cuda":
            hold_to_budget(device, gpu_bytes)
        import torch

        # float32, as the streamed evaluation computes (stream_eval.COMPUTE_DTYPE): a bfloat16 checkpoint loaded in its
        # own dtype scored another perplexity (1e-3 relative on a tiny model) than the streamed "same figure"
        model = load(args.model, dtype=torch.float32, verify=not args.no_verify).to(device)
        from .model.architecture import check_seqlen

        check_seqlen(model.config, args.seqlen)
        text, _ = load_texts(args.text, "--text")
        result = perplexity(model, load_tokenizer(Path(args.model)), text, args.seqlen, args.max_windows,
                            progress=not args.no_progress, device=device)
        # the streamed result's keys, so a script reads either the same way (one window per forward, nothing on disk)
        result.update(batch_size=1, hidden_on_disk=False, device=str(device), in_memory=True)
        if device.type == "cuda":
            result.update(head_on_device=True, gpu_peak_bytes=peak_bytes(device), max_gpu_mem_bytes=gpu_bytes)
    else:
        from .job.stream_eval import streaming_perplexity

        text, _ = load_texts(args.text, "--text")
        from .job.distributed import World

        world = World.current()
        result = streaming_perplexity(args.model, text, args.seqlen, args.max_windows, max_mem=max_mem,
                                      work_dir=args.work_dir, progress=not args.no_progress and world.writes,
                                      batch_size=args.batch_size, device=args.device, max_gpu_mem=max_gpu_mem,
                                      verify=not args.no_verify)
        if not world.writes:
            return 0
        result["in_memory"] = False
    source = ", ".join(args.text)  # as typed (load_texts gives the names, for what a job records)
    result = {"model": args.model, "text": source, **result}
    if not math.isfinite(result["perplexity"]):  # and `--json` would print NaN, which JSON does not have
        raise StreamSVDError(f"the perplexity of {args.model} is not finite ({result['perplexity']}): its outputs "
                             "overflow or are NaN on this text",
                             "check the model's weights (`streamsvd verify OUT_DIR` for a streamsvd output); a checkpoint "
                             "with non-finite weights or norms cannot be evaluated")
    if args.json:
        print(json.dumps(result))
    else:
        print(f"perplexity {result['perplexity']:.3f} over {result['tokens_scored']} tokens "
              f"({result['windows']} windows of {args.seqlen}) of {source}")
    return 0


def cmd_import_gguf(args) -> int:
    import torch

    from .io.gguf_import import import_gguf

    out = import_gguf(Path(args.gguf), Path(args.out_dir), dtype=getattr(torch, args.dtype))
    print(f"wrote {out}")
    return 0


def cmd_verify(args) -> int:
    from .job.verify import verify

    try:
        result = verify(Path(args.out_dir))
    except StreamSVDError as e:  # not an output at all: --json still prints one object for scripts (ok false)
        if args.json:
            print(json.dumps({"out_dir": str(args.out_dir), "complete": False, "blocks_done": 0, "files_checked": 0,
                              "damaged": [], "files_ok": False, "ok": False, "fix": e.fix, "error": e.problem, "note": None,
                              "made_by": None}))
        raise
    if args.json:
        print(json.dumps(result))
    else:
        for item in result["damaged"]:
            print(f"damaged: {item['file']}: {item['problem']}")
        print(f"{'ok' if result['files_ok'] else 'NOT ok'}: {result['files_checked']} files checked in {args.out_dir}"
              f"{'' if result['complete'] else ' (the job is unfinished)'}")
        if result["note"]:
            print(f"note: {result['note']}")
    if not result["files_ok"]:
        raise StreamSVDError(
            f"{len(result['damaged'])} file(s) of {args.out_dir} are damaged or missing", result["fix"],
        )
    if not result["complete"]:
        what = ("an unfinished `streamsvd quantize` (it was stopped)" if result["made_by"] == "quantize"
                else f"an unfinished job ({result['blocks_done']} blocks done)")
        raise StreamSVDError(f"{args.out_dir} holds {what}: the files written so far check out, but it is not a model yet",
                             result["fix"])
    return 0


def export_dense(args) -> int:
    from .export.dense import export_dense as export

    result = export(Path(args.out_dir), Path(args.dir), log=lambda line: print(line, file=sys.stderr),
                    verify=not args.no_verify)
    print(f"wrote {result['dir']}: {result['modules_multiplied']} compressed linears multiplied back, "
          f"{result['dense_bytes']:,} bytes of weights (OUT_DIR: {result['factored_bytes']:,})"
          + (f"; {result['shards_kept']} shard{'s' if result['shards_kept'] > 1 else ''} kept from the stopped export"
             if result["shards_kept"] else ""))
    return 0


def export_onnx(args) -> int:
    from .export.onnx import export_onnx as export
    from .job.memory import format_size

    if args.onnx_block_size is not None and not args.onnx_int4:  # the block of 4-bit quantisation: no effect
        raise StreamSVDError("--onnx-block-size sets the blocks of --onnx-int4's quantisation, which is off",
                             "add --onnx-int4, or drop --onnx-block-size")
    block_size = 32 if args.onnx_block_size is None else args.onnx_block_size
    rec = export(Path(args.out_dir), Path(args.dir), int4=args.onnx_int4, block_size=block_size,
                 check=not args.no_check, pivoted=args.onnx_pivoted,
                 verify=not args.no_verify)
    quant = f", {rec['matmul_nbits']} of them 4-bit MatMulNBits" if rec["int4"] else ""
    print(f"wrote {Path(args.dir) / rec['file']}: {format_size(rec['bytes'])}, {rec['linears_as_matmul']} linears as "
          f"MatMuls{quant}, KV cache of {rec['cache']['layers']} layers, {rec['export_seconds']:.0f} s")
    check = rec.get("check")
    if check:
        print(f"  onnxruntime vs PyTorch: max |logit difference| {check['prefill_max_abs_diff']:.2e} (prefill), "
              f"{check['decode_max_abs_diff']:.2e} (cached decode step), "
              f"{check.get('padded_decode_max_abs_diff', float('nan')):.2e} (left-padded decode step), "
              f"largest logit {check['max_abs_logit']:.2f}; "
              f"same argmax at {check['argmax_agreement']:.0%} of positions (random tokens)")
        if rec["int4"]:
            print("  4-bit weights move the logits by design: score perplexity on your own text before relying on "
                  "this model (tools/onnx_check.py does it for both runtimes)")
    return 0


# `streamsvd export FORMAT OUT_DIR DIR`: one function per format.
EXPORTS = {"dense": export_dense, "onnx": export_onnx}


def cmd_export(args) -> int:
    if args.format != "onnx" and (args.onnx_int4 or args.onnx_block_size is not None or args.no_check or args.onnx_pivoted is not None):
        raise StreamSVDError(f"--onnx-int4, --onnx-block-size, --onnx-pivoted and --no-check apply to `export onnx`, not `export {args.format}`",
                             "drop them, or export onnx")
    return EXPORTS[args.format](args)


COMMANDS = {"run": cmd_run, "profile": cmd_profile, "plan": cmd_plan, "eval": cmd_eval, "import-gguf": cmd_import_gguf,
            "verify": cmd_verify, "export": cmd_export, "quantize": cmd_quantize}


class _Terminated(list):
    """The SIGTERM that stopped the command, if one did (truthy then), and the handler it replaced."""
    previous = None


def _stop_on_sigterm(distributed: bool) -> _Terminated:
    """SIGTERM (`kill`, a scheduler's stop) ends the command as Ctrl-C does: the writes under way are undone, the lock
    released, and one line says the finished blocks are kept (exit 143). Python's default was to die at once without a
    word. One process only, from the main thread: under torchrun the launcher's SIGTERM keeps its meaning."""
    import signal
    import threading

    terminated = _Terminated()
    if distributed or threading.current_thread() is not threading.main_thread():
        return terminated

    def stop(signum, frame):
        terminated.append(signum)
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends it at once
        raise KeyboardInterrupt

    terminated.previous = signal.signal(signal.SIGTERM, stop)
    return terminated


def _restore_sigterm(terminated: _Terminated) -> None:
    """The handler main() replaced, back (main is also called in-process, by tests and scripts)."""
    if terminated.previous is not None:
        import signal

        signal.signal(signal.SIGTERM, terminated.previous)


# What a full disk's fix says, per command (`run`'s is diskspace.RUN_FIX); and the folder a command writes, named
# where the failed write did not say which file it was (safetensors' writer, a copied tree).
_DISK_FULL_FIXES = {
    "profile": "free space on that disk (or give --work-dir on another disk for the activation files) and run the same "
               "command again",
    "eval": "free space on that disk (or give --work-dir on another disk, or a larger --max-mem so that the hidden "
            "states stay in memory) and run the same command again",
}
_WRITES_INTO = {"run": "out_dir", "profile": "profile_dir", "quantize": "new_dir", "export": "dir", "import-gguf": "out_dir"}


def _disk_full(args, path) -> StreamSVDError:
    from .io.diskspace import RUN_FIX, DiskFull

    where = path or getattr(args, _WRITES_INTO.get(args.command, ""), None) or "this command's output"
    fix = RUN_FIX if args.command == "run" else _DISK_FULL_FIXES.get(args.command, "free space on that disk and run the same command again")
    return DiskFull(where, fix)


def _symlink_loop(e: Exception) -> StreamSVDError:
    """A path given that is a symbolic-link loop (a traceback from pathlib.resolve, found by a probe)."""
    where = getattr(e, "filename", None) or str(e).removeprefix("Symlink loop from ").strip("'")
    return StreamSVDError(f"{where} is a loop of symbolic links", "remove the loop (ls -l shows where each link "
                          "points), or give another path")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # without torch: --help and a refused flag answer at once
    from .job.launcher import launched_distributed  # torch-free: `verify` needs no torch; the commands that do import
    # it inside the try below, where a Ctrl-C during its import is an interruption like any other, not a traceback

    world = None
    terminated = _stop_on_sigterm(launched_distributed())
    try:
        try:
            if launched_distributed():  # torchrun's environment: join the job's process group (job/distributed.py)
                if args.command not in ("run", "profile", "eval"):
                    raise StreamSVDError(f"`streamsvd {args.command}` does not run under torchrun; only `streamsvd run`, "
                                         "`streamsvd profile` and `streamsvd eval` do",
                                         f"run `streamsvd {args.command}` as one process, without torchrun")
                from .job.distributed import World

                world = World.start()
                world.rerun_fix = RERUN.get(args.command, world.rerun_fix)
            return COMMANDS[args.command](args)
        except OSError as e:  # a full disk outside the writers that already report it (e.g. copying the tokenizer)
            from .io.diskspace import is_disk_full

            if isinstance(e, PermissionError):  # EPERM too (an immutable folder), which the writers' checks do not catch
                raise StreamSVDError(f"permission denied on {e.filename or 'a path this command needs'} ({e.strerror})",
                                     "check that path's owner and mode (and the immutable flag: lsattr), or give "
                                     "another directory") from e
            if e.errno == errno.ELOOP:  # pathlib.resolve from Python 3.13 on
                raise _symlink_loop(e) from e
            if not is_disk_full(e):
                raise
            # a failed copy (shutil.copyfile, os.replace) names its source first and the file it wrote second
            raise _disk_full(args, e.filename2 or e.filename) from e
        except Exception as e:  # torch.OutOfMemoryError (a GPU's allocator held to --max-gpu-mem) outside a factorisation
            from .io.diskspace import DiskFull, is_disk_full

            if isinstance(e, DiskFull):  # a writer's own report: the fix worded for this command
                raise _disk_full(args, e.path) from e
            if not isinstance(e, StreamSVDError) and is_disk_full(e):  # safetensors' SafetensorError is no OSError
                raise _disk_full(args, None) from e
            if isinstance(e, RuntimeError) and str(e).startswith("Symlink loop"):  # pathlib.resolve, Python <= 3.12
                raise _symlink_loop(e) from e
            if type(e).__name__ != "OutOfMemoryError":
                raise
            first = str(e).splitlines()[0] if str(e) else "torch.OutOfMemoryError"
            if args.command == "eval":
                raise StreamSVDError(f"out of memory ({first}): the evaluation's batch needed more than its count",
                                     "rerun with a larger --max-gpu-mem (with --device cuda) or --max-mem, or a smaller "
                                     "--batch-size") from e
            raise StreamSVDError(f"out of memory ({first}): the plan counted less than this step needed",
                                 "rerun the same command with a larger --max-gpu-mem (with --device cuda) or --max-mem, "
                                 "or a smaller --batch-size on a new job; the finished blocks are kept") from e
    except StreamSVDError as e:
        if world is not None:
            world.ending = True
        # Under torchrun every rank meets the same input errors: rank 0 prints them (a lost rank: the lowest survivor).
        if not getattr(e, "quiet", launched_distributed() and os.environ.get("RANK", "0") != "0"):
            print(f"error: {e.problem}", file=sys.stderr)
            if e.fix:
                print(f"  fix: {e.fix}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        if world is not None:
            world.ending = True
        if not launched_distributed() or os.environ.get("RANK", "0") == "0":
            what = "stopped (SIGTERM)" if terminated else "interrupted"
            print(f"{what}: {RERUN.get(args.command, RERUN['run'])}", file=sys.stderr)
        return 143 if terminated else 130
    finally:
        _restore_sigterm(terminated)
        if world is not None:
            world.ending = True
            world.stop()


if __name__ == "__main__":
    sys.exit(main())
