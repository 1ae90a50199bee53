"""OUT_DIR layout: shards written as blocks finish, the index last (mergekit's TensorWriter idea).

A reader (streamsvd.load, transformers) only trusts OUT_DIR once the index exists and the state
file says complete, so an interrupted job never looks like a finished model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import INDEX_NAME, SINGLE_NAME, Checkpoint, read_safetensors_header
from ..errors import CheckpointError
from .fsutil import atomic_path, atomic_write_bytes, atomic_write_json
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

    def prepare(self) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / SPECTRA_DIR).mkdir(exist_ok=True)
        for stale in list(self.dir.glob(".*.tmp-*")) + list((self.dir / SPECTRA_DIR).glob(".*.tmp-*")):
            stale.unlink()  # left by a killed process; never renamed into place

    def _save(self, path: Path, tensors: dict[str, torch.Tensor]) -> None:
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in sorted(tensors.items())}, str(tmp), metadata={"format": "pt"})
            tmp.chmod(0o644)  # safetensors creates files 0600; an output model is meant to be shared

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

    def write_block(self, index: int, tensors: dict[str, torch.Tensor], spectra: dict[str, torch.Tensor]) -> None:
        self._save(self.spectra_path(index), spectra)
        self._save(self.block_path(index), tensors)

    def block_intact(self, index: int) -> bool:
        """Whether a finished block's files are still there and whole (a user may have removed one)."""
        return _intact(self.spectra_path(index)) and _intact(self.block_path(index))

    def extra_intact(self) -> bool:
        return _intact(self.extra_path())

    def other_files(self) -> list[Path]:
        """Files copied from MODEL_DIR unchanged at the end (tokenizer, generation config, ...)."""
        return [p for p in sorted(self.ckpt.dir.iterdir()) if p.is_file() and not _is_weight_file(p.name) and p.name != "config.json"]

    def finish(self, config_section: dict, report: dict) -> None:
        for src in self.other_files():
            shutil.copyfile(src, self.dir / src.name)
        config = dict(self.ckpt.config_dict)
        config["streamsvd"] = config_section
        atomic_write_json(self.dir / "config.json", config)
        atomic_write_json(self.dir / REPORT_JSON, report)
        atomic_write_bytes(self.dir / REPORT_MD, markdown_report(report).encode())
        weight_map, total_size = {}, 0
        for shard in range(1, self.total_shards + 1):
            name = block_shard_name(shard, self.total_shards)
            with open(self.dir / name, "rb") as f:
                header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
            for key, info in header.items():
                if key != "__metadata__":
                    weight_map[key] = name
                    total_size += info["data_offsets"][1] - info["data_offsets"][0]
        atomic_write_json(self.dir / INDEX_NAME, {"metadata": {"total_size": total_size}, "weight_map": weight_map})

    def log_run(self, figures: dict) -> dict:
        with open(self.dir / RUN_LOG, "a") as f:
            f.write(json.dumps(figures, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        return figures

    def last_run(self) -> dict:
        try:
            lines = (self.dir / RUN_LOG).read_text().splitlines()
            return json.loads(lines[-1]) if lines else {}
        except (OSError, ValueError):
            return {}

    def read_report(self) -> dict:
        return json.loads((self.dir / REPORT_JSON).read_text())


def _intact(path: Path) -> bool:
    try:
        read_safetensors_header(path)
    except CheckpointError:
        return False
    return True


def _is_weight_file(name: str) -> bool:
    return name.endswith(".safetensors") or name in (INDEX_NAME, SINGLE_NAME) or name.startswith("streamsvd_")


def markdown_report(report: dict) -> str:
    lines = [
        "# streamsvd report",
        "",
        f"- model: `{report['model_dir']}`",
        f"- method: {report['method']}, requested ratio {report['ratio_requested']:.3f}, so each m x n linear keeps "
        f"rank k = floor(m n (1 - {report['ratio_requested']}) / (m + n))",
        f"- compressed linears: {report['linear_params_before']:,} -> {report['linear_params_after']:,} parameters "
        f"(ratio {report['ratio_linear']:.3f})",
        f"- whole model: {report['model_params_before']:,} -> {report['model_params_after']:,} parameters "
        f"(ratio {report['ratio_model']:.3f})",
        f"- calibration: {report['calibration']['samples']} x {report['calibration']['seqlen']} tokens of "
        f"{report['calibration']['source']} (seed {report['calibration']['seed']})",
        "",
        "| module | out x in | rank | truncation loss (RMS per token) |",
        "|---|---|---|---|",
    ]
    for name, m in report["modules"].items():
        lines.append(f"| {name} | {m['out_features']} x {m['in_features']} | {m['rank']} | {m['truncation_loss']:.4g} |")
    return "\n".join(lines) + "\n"
