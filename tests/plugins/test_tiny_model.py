"""The tiny model writer: other shapes for benchmarks (a random SmolLM2-135M-shaped model)."""

from __future__ import annotations

import json

import pytest

from lmserve.backends.torch.weights import load_model
from lmserve.plugins.tiny_model import SMOLLM2_135M_DIMENSIONS, TINY_DIMENSIONS, write_tiny_model


def test_other_dimensions_give_a_model_of_that_shape(tmp_path):
    dimensions = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6,
                      num_key_value_heads=2, max_position_embeddings=512, vocab_size=1000)
    write_tiny_model(tmp_path, dimensions=dimensions)
    config, model = load_model(tmp_path)
    assert (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
            config.num_key_value_heads, config.head_dim) == (48, 3, 6, 2, 8)
    assert config.vocab_size == 1000  # padded past the tokenizer's few hundred tokens
    assert model.lm_head.weight.shape == (1000, 48)
    assert json.loads((tmp_path / "config.json").read_text())["max_position_embeddings"] == 512


def test_the_default_is_the_tiny_shape_and_the_context_can_be_set(tmp_path):
    write_tiny_model(tmp_path, max_position_embeddings=1024)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["hidden_size"] == TINY_DIMENSIONS["hidden_size"]
    assert config["num_hidden_layers"] == TINY_DIMENSIONS["num_hidden_layers"]
    assert config["max_position_embeddings"] == 1024


@pytest.mark.real_model
def test_the_smollm2_shape_is_the_shipped_models(smollm2_gguf):
    real, _ = load_model(smollm2_gguf)
    assert {name: getattr(real, name) for name in SMOLLM2_135M_DIMENSIONS} == SMOLLM2_135M_DIMENSIONS
