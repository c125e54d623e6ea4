"""Real models for the graph tests: all-MiniLM-L6-v2 (offline package) and a LLaMA-style decoder."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm():
    from graphpress.data import load_minilm

    model, tokenizer = load_minilm()
    enc = tokenizer(
        ["Return the sum of a sequence of numbers.", "Open a file and return a stream."],
        padding=True,
        return_tensors="pt",
    )
    return model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture(scope="session")
def llama():
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    input_ids = torch.randint(0, 256, (2, 12))
    return model, {"input_ids": input_ids, "use_cache": False}
