"""Calibration text -> a fixed (samples, seqlen) tensor of token windows, reproducible from a seed."""

from __future__ import annotations

import hashlib
import json
import re
import sys
from collections import OrderedDict
from pathlib import Path

import torch

from ..errors import StreamSVDError

DEFAULT_CALIBRATION = "pydoc"  # Python's own reference docs: real English, in every CPython, no download
DEFAULT_SOURCE = "pydoc_data.topics (Python reference documentation, built in)"
# What `run` says when --calib is left out: whitening fits its calibration text, and this one is narrow.
DEFAULT_WARNING = (
    "warning: no --calib: the statistics come from the built-in text, Python's reference documentation "
    "(technical English); the compressed model will do best on text like it and can do far worse on others "
    "(docs/RESULTS.md: perplexity 1897 on Shakespeare's plays where calibrating on plays gives 131)\n"
    "fix: pass --calib FILE (plain text or .jsonl) with text of the domain the model will be used on"
)


def default_text() -> str:
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


_LONE_SURROGATE = re.compile("[\ud800-\udfff]")  # json.loads pairs a proper surrogate pair's escapes itself


def read_text_file(path: Path, flag: str = "--calib") -> str:
    """Plain text, or .jsonl with a "text" field per line. `flag`: the option that named it (--calib, or eval's --text)."""
    path = Path(path)
    if not path.exists():
        what = "calibration" if flag == "--calib" else "evaluation"
        raise StreamSVDError(f"{what} file {path} does not exist", f"check the {flag} path")
    if not path.is_file():
        raise StreamSVDError(f"{path} is not a file (a directory or a device)", "give a plain-text or .jsonl file")
    data = path.read_bytes()
    raw = data.decode("utf-8", errors="replace")
    # a few stray bytes are kept (replaced); a binary file would tokenize into garbage that calibrates (or scores)
    # nothing the model will see, and must not pass for text
    broken = raw.count("\ufffd") - data.decode("utf-8", errors="ignore").count("\ufffd")
    if b"\x00" in data or broken > max(16, len(raw) // 100):
        why = "it holds NUL bytes" if b"\x00" in data else f"{broken} of its {len(raw)} characters are not UTF-8"
        raise StreamSVDError(f"{path} is not text ({why})", "give a UTF-8 plain-text or .jsonl file")
    if path.suffix != ".jsonl":
        return raw
    texts = []
    # a UTF-8 byte-order mark (Windows editors write one) is not part of the first line's JSON
    # JSON Lines ends a line at \n alone (a \r before it is JSON whitespace): str.splitlines() also broke lines at
    # U+2028, U+2029 and U+0085, which JSON allows raw inside a string (json.dumps(ensure_ascii=False) writes them)
    for lineno, line in enumerate(raw.removeprefix("\ufeff").split("\n"), 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)["text"]
            if not isinstance(value, str):  # {"text": 5} or null was read as the text "5" or "None"
                raise TypeError(f"its text is {type(value).__name__}")
            # a lone surrogate escape ("\ud800", valid JSON) cannot be encoded: the tokenizer raised UnicodeEncodeError
            # (a probe); it is replaced, as stray bytes in a plain text file are
            texts.append(_LONE_SURROGATE.sub("\ufffd", value))
        except (ValueError, KeyError, TypeError, RecursionError) as e:  # RecursionError: nesting deeper than Python's stack
            raise StreamSVDError(
                f"{path}:{lineno} is not a JSON object with a \"text\" string", 'write one {"text": "..."} object per line'
            ) from e
    return "\n\n".join(texts)


def load_texts(paths: list[str] | None, flag: str = "--calib") -> tuple[str, str]:
    """(text, source description): the files' names, not the paths as typed, so config.json and the report are the
    same whichever directory a job is started or resumed from (the path as typed made a resume from elsewhere write
    another config.json), and no folder of the machine it ran on is shipped with the model. `flag`: the option that
    named the files, for the refusal of a missing one."""
    if not paths:
        return default_text(), DEFAULT_SOURCE
    texts = [read_text_file(Path(p), flag) for p in paths]
    for path, text in zip(paths, texts):
        if len(paths) > 1 and not text.strip():  # one alone is refused as empty text where the windows are cut
            raise StreamSVDError(f"{path} holds no text (one of the {len(paths)} {flag} files)",
                                 f"give it text, or leave it out of the {flag} files")
    return "\n\n".join(texts), ", ".join(printable_name(p) for p in paths)


def printable_name(path) -> str:
    """A file's name as UTF-8 text: a name of other bytes (Latin-1 'caf\\xe9.txt') held surrogates that the report
    could not write, after every block was computed, on every rerun (a probe, 2026-12-07)."""
    return Path(path).name.encode("utf-8", "surrogateescape").decode("utf-8", "replace")


def text_digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def windows_digest(windows: torch.Tensor) -> str:
    """Of token windows' ids: the same text cut by another tokenizer gives other windows (a job's and a profile's
    identity carry it beside the text's digest)."""
    return hashlib.sha256(windows.to(torch.int64).numpy().tobytes()).hexdigest()[:16]


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer prepends BOS by itself (Gemma's does and needs it; SmolLM2's does not)."""
    ids = tokenizer("a")["input_ids"]
    return tokenizer.bos_token_id is not None and len(ids) > 0 and ids[0] == tokenizer.bos_token_id


# The last texts' token ids, so the several readers of one calibration text in a process (a job's windows, its
# held-out windows, its own profile's; every job of a test session) tokenize it once. Keyed by the fast tokenizer's
# whole serialised state (vocabulary, merges, normaliser, pre-tokeniser: `to_str`, taken at every call, so a
# tokenizer changed in place misses) and the text's sha256; kept as int32, handed out as a fresh int64 tensor.
# Bounded: TOKEN_CACHE_ENTRIES texts of at most TOKEN_CACHE_MAX tokens (32 MB), made before a job's plan measures
# its baseline, so a job's own entry is in its measured baseline (job/plan.py).
TOKEN_CACHE_ENTRIES, TOKEN_CACHE_MAX = 2, 8_000_000
_token_cache: OrderedDict[tuple, torch.Tensor] = OrderedDict()


def _tokenizer_key(tokenizer) -> tuple | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)  # a slow (Python) tokenizer has none: never cached
    if backend is None:
        return None
    try:
        state = backend.to_str()
    except Exception:  # noqa: BLE001 - a backend that cannot serialise itself is tokenized every time
        return None
    return (type(tokenizer).__qualname__, bool(getattr(tokenizer, "split_special_tokens", False)),
            hashlib.sha256(state.encode()).hexdigest())


def tokenize(tokenizer, text: str) -> tuple[torch.Tensor, int | None]:
    """All tokens of `text` without special tokens, and the BOS id to start each window with (or None)."""
    bos = tokenizer.bos_token_id if adds_bos(tokenizer) else None
    tok_key = _tokenizer_key(tokenizer)
    key = None if tok_key is None else (tok_key, hashlib.sha256(text.encode()).hexdigest())
    if key is not None and key in _token_cache:
        _token_cache.move_to_end(key)
        return _token_cache[key].to(torch.long), bos
    ids = torch.tensor(tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"], dtype=torch.long)
    if key is not None and ids.numel() <= TOKEN_CACHE_MAX and (ids.numel() == 0 or int(ids.max()) < 2**31):
        _token_cache[key] = ids.to(torch.int32)
        while len(_token_cache) > TOKEN_CACHE_ENTRIES:
            _token_cache.popitem(last=False)
    return ids, bos


OVERLAP_WARN = 4  # windows that draw more than this many times the text's tokens get a warning (they overlap)


def sample_windows(tokenizer, text: str, samples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`samples` windows of `seqlen` tokens at random offsets (with replacement, as SVD-LLM/GPTQ do)."""
    if not text.strip():
        raise StreamSVDError("the calibration text is empty", "pass a --calib file that contains text")
    tokens, bos = tokenize(tokenizer, text)
    body = seqlen - (1 if bos is not None else 0)
    if tokens.numel() < body:
        raise StreamSVDError(
            f"the calibration text has {tokens.numel()} tokens, fewer than one window of --seqlen {seqlen} needs"
            + (f" ({body} besides the BOS token every window starts with)" if bos is not None else ""),
            "give more calibration text or a smaller --seqlen",
        )
    if samples * body > OVERLAP_WARN * tokens.numel():
        print(f"warning: {samples} windows x {seqlen} tokens draw {samples * body:,} tokens from a calibration text of "
              f"{tokens.numel():,}: each token is used about {samples * body / tokens.numel():.0f} times, which costs "
              "time and adds little to the statistics; give more text (several --calib files), or fewer --calib-samples",
              file=sys.stderr)
    refuse_windows_beyond_ram(samples, seqlen)
    gen = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, tokens.numel() - body + 1, (samples,), generator=gen)
    # one gather from a view of every window start (a Python list of a view per window cost hundreds of bytes each:
    # 100,000,000 windows were a process killed for memory, not a refusal; a probe, 2026-12-07). The same windows.
    windows = tokens.contiguous().unfold(0, body, 1)[starts]
    if bos is not None:
        windows = torch.cat([torch.full((samples, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def refuse_windows_beyond_ram(samples: int, seqlen: int) -> None:
    """Refuse windows whose token ids alone (8 bytes each, made twice on the way) exceed this machine's RAM, before
    they are made: the process was killed for memory, with no error line."""
    import psutil

    need, total = 2 * 8 * samples * seqlen, psutil.virtual_memory().total
    if need > total:
        from ..job.memory import format_size

        raise StreamSVDError(f"{samples:,} windows x {seqlen} tokens need {format_size(need)} for their token ids alone, "
                             f"more than this machine's {format_size(total)} of RAM",
                             "use fewer --calib-samples or a shorter --seqlen (64 x 512 is the tested default)")


def warn_thin_statistics(samples: int, seqlen: int, widest: tuple[str, int]) -> None:
    """A warning when the calibration windows hold fewer tokens than the widest linear's input: its input Gram then
    has rank at most that many, so every direction beyond is fit to nothing (the eig route solves it, but the kept
    directions past that rank are the weights' own, not the activations'). `widest`: (linear type, in_features)."""
    tokens = samples * seqlen
    name, width = widest
    if tokens < width:
        print(f"warning: {samples} windows x {seqlen} tokens = {tokens:,} calibration tokens, fewer than {name}'s "
              f"{width:,} inputs: its statistics have rank at most {tokens:,}, so the directions beyond are not "
              f"calibrated; give at least {width:,} tokens (--calib-samples x --seqlen), better several times that",
              file=sys.stderr)


HELDOUT_SEED_OFFSET = 0x5EED_0FF  # the held-out windows' generator: another stream than the calibration windows'


def heldout_windows(tokenizer, text: str, calib_samples: int, seqlen: int, seed: int, count: int) -> torch.Tensor:
    """`count` windows of `seqlen` tokens that share no token position with the `calib_samples` calibration windows
    `sample_windows` draws (same text, seqlen and seed), nor with each other (`run --max-ppl-increase`).

    Deterministic: starts drawn one at a time from a generator seeded with seed + HELDOUT_SEED_OFFSET, each
    uniformly among the offsets whose whole window is still free (`heldout_starts`). Refused (error and fix)
    when the text has no room left for them.
    """
    if count <= 0:
        return torch.empty((0, seqlen), dtype=torch.long)
    tokens, bos = tokenize(tokenizer, text)
    _, starts = heldout_starts(tokens.numel(), calib_samples, seqlen - (1 if bos is not None else 0), seed, count)
    body = seqlen - (1 if bos is not None else 0)
    windows = torch.stack([tokens[s : s + body] for s in starts])
    if bos is not None:
        windows = torch.cat([torch.full((count, 1), bos, dtype=torch.long), windows], dim=1)
    return windows


def heldout_starts(n: int, calib_samples: int, body: int, seed: int, count: int) -> tuple[list[int], list[int]]:
    """(the calibration windows' starts, as sample_windows draws them; the held-out windows' starts) in a text of
    `n` tokens, windows of `body` tokens (BOS not counted)."""
    if n < body:
        raise StreamSVDError(
            f"the calibration text has {n} tokens, fewer than one window of {body} tokens",
            "give more calibration text or a smaller --seqlen",
        )
    gen = torch.Generator().manual_seed(seed)  # exactly sample_windows' starts
    calib = torch.randint(0, n - body + 1, (calib_samples,), generator=gen).tolist()
    taken = torch.zeros(n + 1, dtype=torch.int32)  # +1 at a window's first position, -1 past its last
    for s in calib:
        taken[s] += 1
        taken[s + body] -= 1
    used = torch.cumsum(taken[:n], 0) > 0
    gen = torch.Generator().manual_seed(seed + HELDOUT_SEED_OFFSET)
    starts = []
    for _ in range(count):
        busy = torch.cat([torch.zeros(1, dtype=torch.int64), torch.cumsum(used.to(torch.int64), 0)])
        free = ((busy[body:] - busy[:-body]) == 0).nonzero().flatten()  # offsets whose window touches no used token
        if free.numel() == 0:
            raise StreamSVDError(
                f"the calibration text ({n} tokens) has room for only {len(starts)} of {count} held-out windows of "
                f"{body} tokens outside the {calib_samples} calibration windows",
                "give more calibration text (--calib), fewer --calib-samples, or a smaller --heldout-samples",
            )
        s = int(free[int(torch.randint(0, free.numel(), (1,), generator=gen))])
        starts.append(s)
        used[s : s + body] = True
    return calib, starts


def _base_config_kwargs(model_dir: Path) -> dict:
    """For a streamsvd output (config.json of model_type "streamsvd"), the base family's config, so that
    AutoTokenizer does not ask to run OUT_DIR's remote code (it reads the model config first)."""
    import json

    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    from ..model.remote.modeling_streamsvd import MODEL_TYPE, base_config_dict

    try:
        config_dict = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(config_dict, dict) or config_dict.get("model_type") != MODEL_TYPE:
        return {}
    base = base_config_dict(config_dict)
    if base.get("model_type") not in CONFIG_MAPPING:
        return {}
    return {"config": CONFIG_MAPPING[base.pop("model_type")].from_dict(base)}


def load_tokenizer(model_dir: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_dir, **_base_config_kwargs(model_dir))
    except Exception as e:  # noqa: BLE001 - a damaged tokenizer.json fails as KeyError, TypeError, tokenizers' Exception
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise StreamSVDError(
            f"cannot load a tokenizer from {model_dir} ({type(e).__name__}: {first})",
            "copy the model's own tokenizer files (tokenizer.json, tokenizer_config.json) into MODEL_DIR; "
            "they are missing or damaged",
        ) from e
