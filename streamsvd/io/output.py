"""OUT_DIR layout: shards written as blocks finish, the index last (mergekit's TensorWriter idea).

A reader (streamsvd.load, transformers) only trusts OUT_DIR once the index exists and the state
file says complete, so an interrupted job never looks like a finished model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .. import faults
from .checksums import file_record
from .checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, read_safetensors_header
from ..errors import CheckpointError
from ..model.remote import MODELING_FILE, modeling_source
from ..model.remote.modeling_streamsvd import remote_config_dict
from .fsutil import atomic_path, atomic_write_bytes, atomic_write_json, remove_temporaries
from .streamcopy import copy_tensors

REPORT_JSON = "streamsvd_report.json"
REPORT_MD = "streamsvd_report.md"
# Run-dependent figures (wall time, peak RSS, ...), one JSON line per run that finished the job; kept
# out of the reports so that those are byte-identical however the job was interrupted.
RUN_LOG = "streamsvd_runs.jsonl"
SPECTRA_DIR = "spectra"


def block_shard_name(shard: int, total: int) -> str:
    return f"model-{shard:05d}-of-{total:05d}.safetensors"


class OutputWriter:
    def __init__(self, out_dir: Path, checkpoint: Checkpoint, n_layers: int, layers_path: str = "model.layers"):
        self.dir = Path(out_dir)
        self.ckpt = checkpoint
        self.n_layers = n_layers
        self.layers_prefix = layers_path + "."
        self.total_shards = n_layers + 1
        # relative path -> {"size", "sha256"} of every file written; the job points this at its state.
        self.written: dict[str, dict] = {}

    def _record(self, path: Path) -> None:
        self.written[str(Path(path).relative_to(self.dir))] = file_record(path)

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / SPECTRA_DIR).mkdir(exist_ok=True)
        for folder in (self.dir, self.dir / SPECTRA_DIR):
            remove_temporaries(folder)  # left by a killed process (ours and safetensors'); never renamed into place

    def _save(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp), metadata={"format": "pt"})
            tmp.chmod(0o644)  # safetensors creates files 0600; an output model is meant to be shared
        self._record(path)
        faults.point("shard-written")

    def extra_names(self) -> list[str]:
        return [k for k in self.ckpt.keys() if not k.startswith(self.layers_prefix)]

    def extra_path(self) -> Path:
        return self.dir / block_shard_name(1, self.total_shards)

    def block_path(self, index: int) -> Path:
        return self.dir / block_shard_name(index + 2, self.total_shards)

    def spectra_path(self, index: int) -> Path:
        return self.dir / SPECTRA_DIR / f"block-{index:05d}.safetensors"

    def write_extra_shard(self) -> None:
        """Tensors outside the decoder layers (embeddings, final norm, untied head), copied unchanged.

        Byte for byte from the checkpoint's files (io/streamcopy.py): never all in memory at once.
        """
        with atomic_path(self.extra_path()) as tmp:
            copy_tensors(self.ckpt, self.extra_names(), tmp)
            tmp.chmod(0o644)
        self._record(self.extra_path())
        faults.point("shard-written")

    def write_block(self, index: int, tensors: dict[str, torch.Tensor], spectra: dict[str, torch.Tensor]) -> None:
        self._save(self.spectra_path(index), spectra)
        self._save(self.block_path(index), tensors)

    def block_intact(self, index: int) -> bool:
        """Whether a finished block's files are still there and whole (a user may have removed one)."""
        return self.file_intact(self.spectra_path(index)) and self.file_intact(self.block_path(index))

    def extra_intact(self) -> bool:
        return self.file_intact(self.extra_path())

    def file_intact(self, path: Path) -> bool:
        """The cheap check: there, the size recorded when it was written, and a whole safetensors header."""
        record = self.written.get(str(Path(path).relative_to(self.dir)))
        try:
            if record is not None and Path(path).stat().st_size != record["size"]:
                return False
        except OSError:
            return False
        return _intact(path) if Path(path).suffix == ".safetensors" else Path(path).is_file()

    def other_files(self) -> list[Path]:
        """Files copied from MODEL_DIR unchanged at the end (tokenizer, generation config, ...)."""
        return [p for p in sorted(self.ckpt.dir.iterdir()) if p.is_file() and not _is_weight_file(p.name) and p.name != "config.json"]

    def finish(self, config_section: dict, report: dict, before_index=None, pictures: dict[str, bytes] | None = None) -> None:
        """Everything but the shards, the index last; `before_index(record)` runs just before it is written.

        `pictures`: file name -> bytes (io/plots.py), written before the report that names them."""
        for src in self.other_files():
            with atomic_path(self.dir / src.name) as tmp:
                shutil.copyfile(src, tmp)
            self._record(self.dir / src.name)
            faults.point("finish-file")
        # The remote code first, then the config.json that names it (auto_map): plain transformers loads
        # OUT_DIR with trust_remote_code=True, and without it refuses (model_type "streamsvd").
        atomic_write_bytes(self.dir / MODELING_FILE, modeling_source())
        self._record(self.dir / MODELING_FILE)
        faults.point("finish-file")
        atomic_write_json(self.dir / "config.json", remote_config_dict(self.ckpt.config_dict, config_section))
        self._record(self.dir / "config.json")
        faults.point("finish-file")
        for name, data in sorted((pictures or {}).items()):
            atomic_write_bytes(self.dir / name, data)
            self._record(self.dir / name)
            faults.point("finish-file")
        atomic_write_json(self.dir / REPORT_JSON, report)
        self._record(self.dir / REPORT_JSON)
        faults.point("finish-file")
        atomic_write_bytes(self.dir / REPORT_MD, markdown_report(report).encode())
        self._record(self.dir / REPORT_MD)
        faults.point("finish-file")
        index = self.index_bytes()
        self.written[INDEX_NAME] = {"size": len(index), "sha256": hashlib.sha256(index).hexdigest()}
        if before_index is not None:
            before_index()
        atomic_write_bytes(self.dir / INDEX_NAME, index)
        faults.point("index-written")

    def index_bytes(self) -> bytes:
        weight_map, total_size = {}, 0
        for shard in range(1, self.total_shards + 1):
            name = block_shard_name(shard, self.total_shards)
            with open(self.dir / name, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            for key, info in header.items():
                if key != "__metadata__":
                    weight_map[key] = name
                    total_size += info["data_offsets"][1] - info["data_offsets"][0]
        index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
        return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()

    def log_run(self, figures: dict) -> dict:
        with open(self.dir / RUN_LOG, "a") as f:
            f.write(json.dumps(figures, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return figures

    def last_run(self) -> dict:
        return last_run(self.dir)

    def read_report(self) -> dict:
        return json.loads((self.dir / REPORT_JSON).read_text())


def last_run(out_dir: Path) -> dict:
    """The figures of OUT_DIR's latest run (the last line of its run log; {} where there is none): the summary reads
    them, and so do the benchmarks under tools/."""
    try:
        lines = (Path(out_dir) / RUN_LOG).read_text().splitlines()
        return json.loads(lines[-1]) if lines else {}
    except (OSError, ValueError):
        return {}


def _intact(path: Path) -> bool:
    try:
        read_safetensors_header(path)
    except CheckpointError:
        return False
    return True


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or name in (INDEX_NAME, SINGLE_NAME, MODELING_FILE) or name.startswith("streamsvd_")


def markdown_report(report: dict) -> str:
    lines = [
        "# streamsvd report",
        "",
        f"- model: `{report['model_dir']}`",
        f"- method: {report['method']}, "
        + ("a quality target" if report["ratio_requested"] is None else f"requested ratio {report['ratio_requested']:.3f}")
        + ", so each m x n linear keeps "
        + _rank_rule(report),
        f"- compressed linears: {report['linear_params_before']:,} -> {report['linear_params_after']:,} parameters "
        f"(ratio {report['ratio_linear']:.3f})",
        f"- whole model: {report['model_params_before']:,} -> {report['model_params_after']:,} parameters "
        f"(ratio {report['ratio_model']:.3f})",
        *_bytes_lines(report),
        *_perplexity_lines(report),
        f"- calibration: {report['calibration']['samples']} x {report['calibration']['seqlen']} tokens of "
        f"{report['calibration']['source']} (seed {report['calibration']['seed']})",
        *[f"\n![{Path(name).stem}]({name})" for name in report.get("plots", [])],
        *_module_table(report["modules"]),
    ]
    return "\n".join(lines) + "\n"


def _module_table(modules: dict) -> list[str]:
    """Per linear: its rank and truncation loss, and with compensation its output error. A compensated linear's
    truncation loss is what truncation adds to the best full-rank fit's objective, the anchor term included
    (docs/DESIGN.md), so it is not the output error; both are shown, named for what they are."""
    compensated = any("output_error" in m for m in modules.values())
    if not compensated:
        lines = ["", "| module | out x in | rank | truncation loss (RMS per token) |", "|---|---|---|---|"]
    else:
        lines = ["",
                 "Compensated: the truncation loss is what the rank adds to the objective of the best full-rank fit "
                 "(output error and anchor term together); the output error is against the original model's outputs, "
                 "both RMS per token on the calibration windows.",
                 "", "| module | out x in | rank | truncation loss (objective) | output error vs the original |",
                 "|---|---|---|---|---|"]
    for name, m in modules.items():
        rank = f"{m['rank']} ({m['form']})" if "form" in m else f"{m['rank']}"
        row = f"| {name} | {m['out_features']} x {m['in_features']} | {rank} | {m['truncation_loss']:.4g} |"
        if compensated:
            row += f" {m['output_error']:.4g} |" if "output_error" in m else " - |"
        lines.append(row)
    return lines


def _bytes_lines(report: dict) -> list[str]:
    if "linear_bytes_before" not in report:
        return []
    q = report.get("quantization")
    how = f", factors quantised to int{q['num_bits']} per group of {q['group_size']} ({q['format']})" if q else ""
    return [f"- compressed linears on disk: {report['linear_bytes_before']:,} -> {report['linear_bytes_after']:,} bytes "
            f"(ratio {report['bytes_ratio_linear']:.3f}{how})"]


def perplexity_target_lines(alloc: dict) -> list[str]:
    """--max-ppl-increase's figures, and a warning when the measured perplexity misses the target (the CLI prints them too)."""
    if alloc.get("max_ppl_increase") is None:
        return []
    lines = [f"held-out perplexity ({alloc['heldout_samples']} windows, {alloc['heldout_tokens']:,} tokens kept out of the "
             f"statistics): original {alloc['original_ppl']:.3f}, target {alloc['target_ppl']:.3f} "
             f"(+{alloc['max_ppl_increase']:.0%}), predicted {alloc['predicted_ppl']:.3f}, measured {alloc['measured_ppl']:.3f}"]
    if not alloc["target_met"]:
        lower = lower_target(alloc)
        what = (f"run again with a lower --max-ppl-increase (e.g. {lower:.2g}) into a new OUT_DIR" if lower is not None else
                f"no lower --max-ppl-increase is worth a run: the one this miss points to is below "
                f"{smallest_target(alloc):.1g}, about the smallest increase the held-out perplexity resolves (float32); "
                f"this output measured "
                f"+{alloc['measured_ppl'] / alloc['original_ppl'] - 1:.2g}")
        lines.append(f"warning: the measured held-out perplexity {alloc['measured_ppl']:.3f} is above the target "
                     f"{alloc['target_ppl']:.3f} (the prediction, {alloc['predicted_ppl']:.3f}, was too optimistic): "
                     + what)
    return lines


def smallest_target(alloc: dict) -> float:
    """The smallest --max-ppl-increase a held-out measurement can tell from none: one float32 step of the mean NLL
    (log of the original perplexity) the perplexities come from. A lower bound (a deep model's forward adds more
    round-off: a 3-block tiny model at full rank measured 3e-7 where this gives 7e-7)."""
    import math

    return math.expm1(torch.finfo(torch.float32).eps * max(math.log(alloc["original_ppl"]), 1.0))


def lower_target(alloc: dict) -> float | None:
    """A --max-ppl-increase to try after a miss: the target scaled by how far the prediction fell short
    (predicted over measured NLL increase), so that the same error would land on the original target. None when
    that is below smallest_target: a target of 1e-9 missed at nearly full ranks pointed to 1e-14, a figure no
    measurement resolves (and a run at it to 1e-23 next)."""
    import math

    f = alloc["max_ppl_increase"]
    predicted = math.log(alloc["predicted_ppl"] / alloc["original_ppl"])
    measured = math.log(alloc["measured_ppl"] / alloc["original_ppl"])
    lower = f / 2 if predicted <= 0 or measured <= predicted else math.expm1(math.log1p(f) * predicted / measured)
    return lower if lower >= smallest_target(alloc) else None


def _perplexity_lines(report: dict) -> list[str]:
    return [f"- {line}" for line in perplexity_target_lines(report.get("allocation") or {})]


def _rank_rule(report: dict) -> str:
    ratio = report["ratio_requested"]
    alloc = report.get("allocation")
    if alloc:  # ranks from a profile (math/allocate.py), not one rule per matrix
        goals = []
        if alloc.get("max_ppl_increase") is not None:
            goals.append(f"predicted held-out perplexity <= (1 + {alloc['max_ppl_increase']}) x the original's")
        if alloc.get("max_loss") is not None:
            goals.append(f"predicted relative loss <= {alloc['max_loss']}")
        target = (f"the smallest model with {' and '.join(goals)}" if goals
                  else f"one budget of (1 - {ratio}) x the linears' parameters")
        return (f"the rank the `{alloc['alloc']}` allocator gave it ({target}; rank multiple {alloc['rank_multiple']}; "
                f"predicted relative loss {alloc['relative_loss']:.4f}; {alloc['profile']['profiling']}: "
                f"`{alloc['profile']['dir']}`)")
    if report.get("factors") == "pivoted":
        return (f"the largest rank r with r (m + n - r) <= (1 - {ratio}) m n, stored as pivoted factors "
                "(r (m + n - r) numbers; dense where that would not be smaller)")
    return f"rank k = floor(m n (1 - {ratio}) / (m + n))"
