"""The tests' tiny checkpoints: the demo's model builders (deploy/demo_model.py)."""

from deploy.demo_model import load_reference, make_bloom, make_llama_family, make_opt, train_tokenizer  # noqa: F401


def make_llama(directory, **kw):
    return make_llama_family(directory, "llama", **kw)


def make_mistral(directory, **kw):
    return make_llama_family(directory, "mistral", **kw)


def make_qwen2(directory, **kw):
    return make_llama_family(directory, "qwen2", tie_word_embeddings=True, **kw)
