"""Lazy, validated reading of a Hugging Face safetensors checkpoint (one tensor at a time).

Every shard's header is checked up front (present, parseable, not truncated), so a bad checkpoint
fails in a second with a clear message instead of an hour into a job.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import CheckpointError
from ..timing import charged
# torch-free (streamsvd verify reads headers without importing torch); imported here for every other reader
from .safetensors_header import INDEX_NAME, SINGLE_NAME, read_safetensors_header  # noqa: F401

# safetensors dtype names -> torch dtypes (one table for every reader of stored dtypes)
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                "BOOL": torch.bool}


COMPUTED_BUFFERS = ("rotary_emb.inv_freq",)  # name endings of stored buffers that are ignored (Checkpoint.ignored)


class Checkpoint:
    """A checkpoint directory: config, tensor-to-shard map, memory-mapped reads on demand."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        self.read_digests: dict[str, str] | None = None  # name -> sha256 of each tensor read, while not None
        if not self.dir.is_dir():
            raise CheckpointError(f"model directory {self.dir} " + ("is a file, not a directory" if self.dir.exists()
                                                                   else "does not exist"), "check the MODEL_DIR path")
        config_path = self.dir / "config.json"
        if not config_path.is_file():
            raise CheckpointError(
                f"{self.dir} has no config.json",
                f"run the same `streamsvd run` command again: it finishes or repairs {self.dir}"
                if _streamsvd_output(self.dir) else
                "point MODEL_DIR at a Hugging Face checkpoint directory (config.json + *.safetensors); "
                "for a GGUF file run `streamsvd import-gguf FILE DIR` first",
            )
        try:
            self.config_dict = json.loads(config_path.read_text())
        except (ValueError, RecursionError) as e:  # RecursionError: nesting deeper than Python's stack (a probe)
            raise CheckpointError(f"{config_path} is not valid JSON ({e})", "restore the original config.json") from e
        if not isinstance(self.config_dict, dict):
            raise CheckpointError(f"{config_path} is not a JSON object", "restore the original config.json")
        # A streamsvd output's config.json says model_type "streamsvd" (for transformers' remote code);
        # every reader here sees the base family's config, with the "streamsvd" section.
        from ..model.remote.modeling_streamsvd import base_config_dict

        self.raw_config_dict = self.config_dict
        self.config_dict = base_config_dict(self.config_dict)
        self.weight_map = self._read_weight_map()
        # Stored copies of buffers every transformers version computes from config.json (a rotary embedding's
        # inv_freq, saved by versions before they were non-persistent, per layer or once): transformers ignores them
        # when it loads the checkpoint, and so does every reader here (the job copied a per-layer one into its output,
        # which nothing could then load, and streamsvd.load put a stored one over the computed frequencies).
        self.ignored = sorted(k for k in self.weight_map if k.endswith(COMPUTED_BUFFERS))
        for name in self.ignored:
            del self.weight_map[name]
        self.headers = {shard: read_safetensors_header(self.dir / shard) for shard in sorted(set(self.weight_map.values()))}
        for name, shard in self.weight_map.items():
            if name not in self.headers[shard]:
                raise CheckpointError(
                    f"{INDEX_NAME} says {name} is in {shard}, but that shard does not hold it",
                    "the index and the shards are from different checkpoints; re-download them together",
                )

    def _read_weight_map(self) -> dict[str, str]:
        index_path, single = self.dir / INDEX_NAME, self.dir / SINGLE_NAME
        # transformers loads model.safetensors where a folder also has an index (a stale one, or other shards): the
        # job compressed the index's weights, not the model MODEL_DIR loads as
        if index_path.is_file() and not single.is_file():
            try:
                weight_map = json.loads(index_path.read_text())["weight_map"]
                # a map of tensor names to shard file names: null, a list or a number there gave a traceback (a probe)
                if not (isinstance(weight_map, dict) and all(isinstance(v, str) and v for v in weight_map.values())):
                    raise ValueError("its weight_map is not a map of tensor names to shard file names")
            except (ValueError, KeyError, TypeError, RecursionError) as e:
                raise CheckpointError(f"{index_path} is not a valid index ({e})", "re-download the index file") from e
            missing = sorted({s for s in weight_map.values() if not (self.dir / s).is_file()})
            if missing:
                output = _streamsvd_output(self.dir)
                raise CheckpointError(
                    f"{index_path.name} names shard(s) that are missing: {', '.join(missing)}",
                    f"run the same `streamsvd run` command again: it redoes the missing shards of {self.dir}" if output
                    else f"copy the missing shard files into {self.dir}",
                )
            return dict(weight_map)
        if single.is_file():
            header = read_safetensors_header(single)
            return {k: SINGLE_NAME for k in header if k != "__metadata__"}
        if list(self.dir.glob("*.safetensors")):
            raise CheckpointError(
                f"{self.dir} has safetensors shards but no {INDEX_NAME}",
                f"copy the {INDEX_NAME} that came with the shards",
            )
        raise CheckpointError(
            f"{self.dir} holds no safetensors weights (no {SINGLE_NAME} or {INDEX_NAME})",
            "convert the checkpoint to safetensors (transformers' save_pretrained does), or import a GGUF "
            "file with `streamsvd import-gguf`",
        )

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def dtype_name(self, name: str) -> str:
        return self.headers[self.weight_map[name]][name]["dtype"]

    def shape(self, name: str) -> list[int]:
        return list(self.headers[self.weight_map[name]][name]["shape"])

    def numel(self, name: str) -> int:
        n = 1
        for d in self.shape(name):
            n *= d
        return n

    def nbytes(self, name: str) -> int:
        start, stop = self.headers[self.weight_map[name]][name]["data_offsets"]
        return stop - start

    def get(self, name: str) -> torch.Tensor:
        if name not in self.weight_map:
            raise CheckpointError(
                f"tensor {name} is missing from the checkpoint in {self.dir}",
                "the checkpoint does not match its config.json; re-download or re-export it",
            )
        # One short-lived handle per read: get_tensor copies out of the memory map, and a handle kept
        # open keeps every page read through it resident, so RSS would grow by the whole checkpoint
        # over a job (measured: +530 MB on SmolLM2). Reopening costs one header parse per tensor.
        with charged("read"):  # the weights' reads (and their checksums) in a job's time split (streamsvd/timing.py)
            with safe_open(str(self.dir / self.weight_map[name]), framework="pt", device="cpu") as f:
                tensor = f.get_tensor(name)
            if self.read_digests is not None:  # the job records what it read (identity by content)
                from .checksums import tensor_sha256

                self.read_digests[name] = tensor_sha256(tensor)
            _refuse_non_finite(self.dir, name, tensor)
        return tensor

    def fingerprint(self) -> dict:
        """What identifies this checkpoint for resume checks: config and shard sizes."""
        return {
            "config": self.config_dict,
            "shards": {s: (self.dir / s).stat().st_size for s in sorted(self.headers)},
        }


def _refuse_non_finite(where: Path, name: str, tensor: torch.Tensor) -> None:
    """A weight the job reads holding NaN or inf: refused by name, not a LinAlgError traceback halfway through the job.
    Checked a chunk of a million values at a time (no tensor-sized temporary), as the digest reads every byte anyway."""
    if not tensor.is_floating_point():
        return
    for chunk in tensor.detach().reshape(-1).split(1 << 20):
        if not bool(torch.isfinite(chunk).all()):
            raise CheckpointError(f"the checkpoint's {name} in {where} holds NaN or infinite values",
                                  "the checkpoint is damaged or was saved wrongly: re-download or re-export it")


def _streamsvd_output(folder: Path) -> bool:
    """Whether `folder` is a streamsvd OUT_DIR (its job state is there): a missing shard is then the job's to redo."""
    from ..job.state import STATE_NAME  # lazy: the job package imports this module

    return (Path(folder) / STATE_NAME).is_file()
