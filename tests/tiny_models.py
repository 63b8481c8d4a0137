"""The tests' tiny checkpoints: the demo's model builders (deploy/demo_model.py)."""

from deploy.demo_model import load_reference, make_bloom, make_llama_family, make_opt, train_tokenizer  # noqa: F401


def converted(name: str, tmp_path_factory, bits: int = 16, **convert_kw):
    """A tiny `name` checkpoint saved by transformers in a fresh temporary directory
    (make_<name>), and its Strata conversion at `bits` beside it: (hf dir, shards dir)."""
    from tools.convert import convert

    hf = tmp_path_factory.mktemp(name) / "hf"
    globals()[f"make_{name}"](hf)
    out = hf.parent / (f"s{bits}" if bits == 16 else f"q{bits}")
    convert(hf, out, bits=bits, **convert_kw)
    return hf, out


def greedy_reference(hf_dir, prompts: list[list[int]], new: int) -> list[list[int]]:
    """Hugging Face's greedy continuation (`new` tokens) of each prompt, one at a time."""
    import torch

    ref = load_reference(hf_dir)
    return [ref.generate(torch.tensor([p]), max_new_tokens=new, do_sample=False, pad_token_id=0)[0, len(p):].tolist()
            for p in prompts]


def make_llama(directory, **kw):
    return make_llama_family(directory, "llama", **kw)


def make_mistral(directory, **kw):
    return make_llama_family(directory, "mistral", **kw)


def make_qwen2(directory, **kw):
    return make_llama_family(directory, "qwen2", tie_word_embeddings=True, **kw)


_SMALL = dict(vocab_size=512, hidden_size=128, num_attention_heads=4, num_hidden_layers=3, intermediate_size=256,
              max_position_embeddings=128, pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def make_gpt_neox(directory, seed=0, **kw):
    """GPT-NeoX (Pythia's layer): parallel residual, fused q/k/v, partial RoPE (0.25)."""
    return _make(directory, "gpt_neox", seed, {**_SMALL, **kw})


def make_stablelm(directory, seed=0, **kw):
    """StableLM: LayerNorm, partial RoPE (0.25), SwiGLU, grouped-query attention."""
    return _make(directory, "stablelm", seed, {**_SMALL, "num_key_value_heads": 2, **kw})


def _make(directory, model_type, seed, cfg):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from deploy.demo_model import _save

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **cfg))
    with torch.no_grad():  # norms and biases off their 1 / 0 init, so that their use is checked too
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    _save(model, directory)
    return directory
