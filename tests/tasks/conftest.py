"""Fixtures for the task tests (built in tests/tasks/_task_tokenizer.py): no downloads.

``tokenizer``: a GPT-2-like byte-level BPE trained in memory on the task words.
``bos_tokenizer``: the same with a Llama-like BOS put in front of every text.
``tiny_model_dir``: a folder with a tiny random GPT-2 (n_layer=2, n_head=2, n_embd=32,
vocab_size=len(tokenizer)) and that tokenizer, both written with ``save_pretrained``; other
test folders can build the same with ``_task_tokenizer.save_tiny_model(folder)``.
"""

import pytest

from tests.tasks._task_tokenizer import build_tokenizer, save_tiny_model


@pytest.fixture(scope="session")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="session")
def bos_tokenizer():
    return build_tokenizer(with_bos=True)


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer):
    return save_tiny_model(tmp_path_factory.mktemp("tiny_gpt2"), tokenizer)
