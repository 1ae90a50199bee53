"""io/calibration.tokenize keeps the last texts' token ids: the same ids as a fresh tokenization, never another
tokenizer's or another text's, a fresh tensor each time, and bounded."""

import pytest
import torch
from tokenizers import processors

from streamsvd.io import calibration
from streamsvd.io.calibration import default_text, sample_windows, tokenize
from tiny_models import tiny_tokenizer

TEXT = default_text()[:20_000]


@pytest.fixture(autouse=True)
def empty_cache(monkeypatch):
    monkeypatch.setattr(calibration, "_token_cache", type(calibration._token_cache)())


def _fresh(tokenizer, text):
    return torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def test_a_second_tokenizer_with_the_same_state_reads_the_cache_and_gets_the_same_ids(monkeypatch):
    first, _ = tokenize(tiny_tokenizer(), TEXT)
    calls = []
    other = tiny_tokenizer()  # another object, the same vocabulary and pipeline (another job's tokenizer)
    real = type(other).__call__
    monkeypatch.setattr(type(other), "__call__", lambda self, *a, **k: calls.append(a) or real(self, *a, **k))
    again, _ = tokenize(other, TEXT)
    assert torch.equal(first, again) and again.dtype == torch.long
    assert not [a for a in calls if a and a[0] == TEXT]  # only adds_bos's probe, not the text
    assert torch.equal(again, _fresh(other, TEXT))


def test_a_changed_tokenizer_or_text_is_tokenized_again():
    tok = tiny_tokenizer()
    plain, bos = tokenize(tok, TEXT)
    assert bos is None
    tok._tokenizer.pre_tokenizer = None  # changed in place after its first use: another state, another key
    changed, _ = tokenize(tok, TEXT)
    assert torch.equal(changed, _fresh(tok, TEXT)) and not torch.equal(changed, plain)
    other_text, _ = tokenize(tok, TEXT + " more")
    assert torch.equal(other_text, _fresh(tok, TEXT + " more"))


def test_bos_is_read_from_the_tokenizer_on_every_call():
    tok = tiny_tokenizer()
    assert tokenize(tok, TEXT)[1] is None
    tok._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    ids, bos = tokenize(tok, TEXT)  # the post-processor is part of the state too; BOS comes from adds_bos
    assert bos == tok.bos_token_id and torch.equal(ids, _fresh(tok, TEXT))


def test_the_ids_handed_out_are_a_fresh_tensor_and_the_windows_are_unchanged():
    tok = tiny_tokenizer()
    windows = sample_windows(tok, TEXT, 5, 32, seed=3)
    ids, _ = tokenize(tok, TEXT)
    ids.zero_()  # a caller writing into its tensor does not reach the cache
    assert torch.equal(tokenize(tok, TEXT)[0], _fresh(tok, TEXT))
    assert torch.equal(sample_windows(tok, TEXT, 5, 32, seed=3), windows)


def test_the_cache_is_bounded_in_texts_and_in_tokens(monkeypatch):
    tok = tiny_tokenizer()
    for i in range(calibration.TOKEN_CACHE_ENTRIES + 2):
        tokenize(tok, f"{i} {TEXT}")
    assert len(calibration._token_cache) == calibration.TOKEN_CACHE_ENTRIES
    monkeypatch.setattr(calibration, "TOKEN_CACHE_MAX", 10)
    tokenize(tok, "a much longer text than ten tokens, " * 5)
    assert len(calibration._token_cache) == calibration.TOKEN_CACHE_ENTRIES
    assert all(v.dtype == torch.int32 for v in calibration._token_cache.values())
