"""The job's defaults that `--help` states, in a module that imports nothing heavy: the parser is built without
torch or transformers, so `streamsvd --help` and a refused flag answer in a fraction of a second (they took 5-7 s
while the parser imported job/pipeline.py for them)."""

DEFAULT_ANCHOR = 0.1  # measured: 0 over-fits the calibration text (cross-domain 2671 vs 393 at 0.1; docs/RESULTS.md)
DEFAULT_REFINE_STEPS = 0  # refinement is off unless asked for
DEFAULT_REFINE_LR = 1e-4
