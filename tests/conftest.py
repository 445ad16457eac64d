"""Shared fixtures: the real default model (loaded once) and tiny random models for unit tests."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(scope="session")
def default_lm():
    """The embedded default, SmolLM2-135M-Instruct (real weights, float32, CPU)."""
    import sparsa

    return sparsa.load_model()


@pytest.fixture(scope="session")
def tokenizer(default_lm):
    return default_lm.tokenizer


def tiny_llama_config(vocab_size: int, **overrides):
    from transformers import LlamaConfig

    values = dict(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=False,
    )
    values.update(overrides)
    return LlamaConfig(**values)


def save_tiny_llama(path, tokenizer):
    """A tiny randomly initialised Llama (seed 0) saved at ``path`` as a Hugging Face directory with ``tokenizer``."""
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny randomly initialised Llama, saved as a Hugging Face directory with the real tokenizer."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), tokenizer)


def byte_tokenizer():
    """A byte-level BPE tokenizer without merges (one token per byte, plus an end-of-text token), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<|endoftext|>": 0, **{char: i + 1 for i, char in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, eos_token="<|endoftext|>", bos_token="<|endoftext|>")


@pytest.fixture(scope="session")
def tiny_bytes_dir(tmp_path_factory):
    """The tiny Llama with a byte-level tokenizer: needs no model package (the GPU tests run from the tree alone)."""
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama-bytes"), byte_tokenizer())


@pytest.fixture
def tiny_lm(tiny_dir):
    import sparsa

    return sparsa.load_model(str(tiny_dir))
