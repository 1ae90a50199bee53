"""What the integrity checks cost, on SmolLM2-135M (float32, 538 MB), as JSON lines.

- identity: reading every checkpoint tensor the way the job does (Checkpoint.get), without and with
  the per-tensor sha256 the job records (`read_digests`), and the re-hash a resume does for
  finished blocks whose shard changed on disk;
- manifest: the sha256 of an output shard as it is written (file_record), per MB;
- scratch: the sha256 of one activation file (64 x 512 x hidden float32), per block.

Projection to a 140 GB checkpoint: the per-byte rates times 140e9 bytes.

    PYTHONPATH=. python tools/bench_integrity.py
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

from streamsvd import assets
from streamsvd.io.checkpoint import Checkpoint
from streamsvd.io.checksums import file_record, file_sha256, group_digest, tensor_sha256


def _best(fn, repeat=3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main() -> None:
    ckpt = Checkpoint(assets.smollm2_checkpoint())
    keys = ckpt.keys()
    nbytes = sum(ckpt.nbytes(k) for k in keys)

    def read_plain():
        ckpt.read_digests = None
        for k in keys:
            ckpt.get(k)

    def read_hashed():
        ckpt.read_digests = {}
        for k in keys:
            ckpt.get(k)
        group_digest(ckpt.read_digests)
        ckpt.read_digests = None

    def rehash():
        group_digest({k: tensor_sha256(ckpt.get(k)) for k in keys})

    read_plain()  # warm the page cache: the job reads from disk once anyway
    plain, hashed, re = _best(read_plain), _best(read_hashed), _best(rehash)
    extra = hashed - plain
    print(json.dumps({"bench": "identity", "model": "SmolLM2-135M", "bytes": nbytes, "read_s": round(plain, 3),
                      "read_and_hash_s": round(hashed, 3), "hash_cost_s": round(extra, 3),
                      "hash_cost_fraction_of_read": round(extra / plain, 3),
                      "hash_s_per_GB": round(extra / nbytes * 1e9, 3),
                      "projected_140GB_s": round(extra / nbytes * 140e9, 1),
                      "resume_rehash_140GB_s": round(re / nbytes * 140e9, 1)}))

    shard = max((ckpt.dir / s for s in ckpt.headers), key=lambda p: p.stat().st_size)
    t = _best(lambda: file_record(shard))
    size = shard.stat().st_size
    print(json.dumps({"bench": "manifest", "file_bytes": size, "sha256_s": round(t, 3),
                      "sha256_s_per_GB": round(t / size * 1e9, 3),
                      "projected_140GB_output_s": round(t / size * 140e9 * 0.6, 1)}))

    hidden = 8192  # a 70B model's activation file: 64 x 512 x 8192 float32 = 1 GiB
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "acts.bin"
        arr = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(64, 512, hidden))
        arr[:] = 1.0
        arr.flush()
        del arr
        t = _best(lambda: file_sha256(path), repeat=2)
        print(json.dumps({"bench": "scratch", "activation_file_bytes": os.path.getsize(path),
                          "sha256_s_per_block": round(t, 3), "projected_80_blocks_s": round(80 * t, 1)}))


if __name__ == "__main__":
    main()
