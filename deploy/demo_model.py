"""Small random Hugging Face checkpoints made with `transformers` (no hub, no network),
each with a byte-level BPE tokenizer trained locally with `tokenizers`. Used by
`strata demo` and by the tests. Weights are saved in float16 so that a 16-bit Strata
conversion holds exactly the numbers a float32 reference loads."""

from __future__ import annotations

import pathlib

import torch

CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "a stack of memory tiers keeps the slowest link busy",
    "weights are stored as int4 layer shards on fast disks",
    "hello world, this is a tiny model trained on nothing at all",
    "attention over the cache runs on the cpu at memory bandwidth",
] * 20


def train_tokenizer(directory: pathlib.Path, vocab_size: int = 300) -> int:
    """Trains and saves the tokenizer; returns its vocabulary size (added tokens included),
    which may be less than `vocab_size` where the corpus has fewer merges."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    fast.save_pretrained(directory)
    return tok.get_vocab_size(with_added_tokens=True)


def make_demo_opt(directory: pathlib.Path, seed: int = 0, **overrides) -> pathlib.Path:
    """`strata demo`'s OPT: its vocabulary is its tokenizer's, so every token it
    generates decodes to text (make_opt's 512 ids are more than its tokenizer's 300)."""
    directory.mkdir(parents=True, exist_ok=True)
    vocab = train_tokenizer(directory)
    return make_opt(directory, seed, tokenizer=False, vocab_size=vocab, **overrides)


def make_opt(directory: pathlib.Path, seed: int = 0, tokenizer: bool = True, **overrides) -> pathlib.Path:
    from transformers import OPTConfig, OPTForCausalLM

    cfg = dict(
        vocab_size=512, hidden_size=128, num_attention_heads=4, num_hidden_layers=3, ffn_dim=256,
        max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, do_layer_norm_before=True, dropout=0.0, attention_dropout=0.0,
    )
    cfg.update(overrides)
    cfg.setdefault("word_embed_proj_dim", cfg["hidden_size"])
    torch.manual_seed(seed)
    model = OPTForCausalLM(OPTConfig(**cfg))
    _save(model, directory, tokenizer)
    return directory


def make_bloom(directory: pathlib.Path, seed: int = 0, **overrides) -> pathlib.Path:
    from transformers import BloomConfig, BloomForCausalLM

    cfg = dict(
        vocab_size=512, hidden_size=128, n_head=4, n_layer=3, pad_token_id=0, bos_token_id=1,
        eos_token_id=2, hidden_dropout=0.0, attention_dropout=0.0,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = BloomForCausalLM(BloomConfig(**cfg))
    _save(model, directory)
    return directory


def make_llama_family(directory: pathlib.Path, model_type: str = "llama", seed: int = 0, **overrides) -> pathlib.Path:
    """Llama, Mistral or Qwen2 (`model_type`): grouped-query attention, RoPE, SwiGLU."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = dict(
        vocab_size=512, hidden_size=128, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=3,
        intermediate_size=256, max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        tie_word_embeddings=False, rms_norm_eps=1e-6,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    _save(model, directory)
    return directory


def _save(model, directory: pathlib.Path, tokenizer: bool = True) -> None:
    from transformers.utils import logging as hf_logging

    directory.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():  # larger weights than HF's init: decisive logits, no greedy near-ties
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.08)
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # no "Writing model shards" bar
    try:
        model.eval().half().save_pretrained(directory, safe_serialization=True)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if tokenizer:
        train_tokenizer(directory)


def load_reference(directory: pathlib.Path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
