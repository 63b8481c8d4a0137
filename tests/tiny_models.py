"""The tests' tiny checkpoints: the demo's model builders (deploy/demo_model.py)."""

from deploy.demo_model import load_reference, make_bloom, make_opt, train_tokenizer  # noqa: F401
