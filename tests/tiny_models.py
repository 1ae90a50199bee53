"""Tiny random checkpoints of every supported family, built from configs (no hub, no download)."""

from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

from streamsvd.io.calibration import default_text

VOCAB = 384

COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=3,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=None,
)

CONFIGS = {
    "llama": dict(COMMON, tie_word_embeddings=False),
    "mistral": dict(COMMON, sliding_window=None),
    "qwen2": dict(COMMON, tie_word_embeddings=True),
    "gemma3_text": dict(
        COMMON,
        num_hidden_layers=4,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "sliding_attention", "full_attention", "sliding_attention"],
        query_pre_attn_scalar=16,
    ),
    # The later families (NEW_FAMILIES) have two layers: tests/model/test_families.py runs each through every command.
    "qwen3": dict(COMMON, num_hidden_layers=2, head_dim=16, tie_word_embeddings=True),
    "phi3": dict(COMMON, num_hidden_layers=2, tie_word_embeddings=False, original_max_position_embeddings=256),
    "gemma2": dict(
        COMMON,
        num_hidden_layers=2,
        head_dim=16,
        sliding_window=8,
        layer_types=["sliding_attention", "full_attention"],
        query_pre_attn_scalar=16,
        final_logit_softcapping=30.0,
        attn_logit_softcapping=50.0,
    ),
    "olmo2": dict(COMMON, num_hidden_layers=2, tie_word_embeddings=False),
    "olmo3": dict(COMMON, num_hidden_layers=2, sliding_window=8, layer_types=["sliding_attention", "full_attention"]),
    "smollm3": dict(COMMON, num_hidden_layers=2, no_rope_layers=[1, 0], tie_word_embeddings=True),  # layer 1 without rotary
}


# The families added after the first four (issue 9): tests/model/test_families.py covers them.
NEW_FAMILIES = ("gemma2", "olmo2", "olmo3", "phi3", "qwen3", "smollm3")


def tiny_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB, special_tokens=["<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([default_text()[:200_000]], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>")
    if add_bos:
        from tokenizers import processors

        fast._tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 0)])
    return fast


def make_tiny_checkpoint(model_type: str, path: Path, seed: int = 0, max_shard_size: str = "100KB",
                         dtype: torch.dtype = torch.float32, **overrides) -> Path:
    """A random model of `model_type` saved as a sharded safetensors checkpoint with a tokenizer."""
    torch.manual_seed(seed)
    config = AutoConfig.for_model(model_type, **dict(CONFIGS[model_type], **overrides))
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    tiny_tokenizer(add_bos=model_type.startswith("gemma")).save_pretrained(path)
    return Path(path)


def first_layer(model_dir: Path, tokens: int = 16):
    """Block 0 of a checkpoint, its inputs for one random window and `forward(layer, hidden)` (as the job runs it)."""
    from streamsvd.io.checkpoint import Checkpoint
    from streamsvd.model.architecture import empty_model, load_config, load_layer
    from streamsvd.model.capture import capture_layer_kwargs, first_layer_inputs, run_layer
    from streamsvd.model.embedding import materialize_base_mapped

    ckpt = Checkpoint(model_dir)
    model = empty_model(load_config(ckpt), torch.float32)
    materialize_base_mapped(model, ckpt, torch.float32)
    windows = torch.randint(0, VOCAB, (1, tokens))
    args, kwargs = capture_layer_kwargs(model, windows)[0]
    layer = load_layer(model, 0, ckpt, torch.float32)
    return layer, first_layer_inputs(model, windows), lambda l, h: run_layer(l, h, args, kwargs)


def record_edits(out: Path, *names: str) -> None:
    """Record in OUT_DIR's state the files `names` as they are now (or forget them where they are gone): what a job
    of the version a test imitates would have recorded, so its readers' checks still run against the state."""
    from streamsvd.io.checksums import file_record
    from streamsvd.job.state import read_state

    state = read_state(out)
    for name in names:
        if (out / name).is_file():
            state.files[name] = file_record(out / name)
        else:
            state.files.pop(name, None)
    state.save(out)
