"""prune_peft._hf: the text config, head size and decoder blocks of transformers models."""

import pytest
from peft import LoraConfig, get_peft_model
from torch import nn

from prune_peft._hf import base_model, decoder_blocks, find_decoder_blocks, head_dim, text_config
from prune_peft.testing import tiny_causal_lm


def test_blocks_config_and_head_dim_of_a_causal_lm():
    model = tiny_causal_lm(num_hidden_layers=3)
    name, blocks = find_decoder_blocks(model)
    assert name == "model.layers" and blocks is model.model.layers and decoder_blocks(model) is blocks
    assert text_config(model) is model.config and text_config(model.config) is model.config
    cfg = model.config
    assert (
        head_dim(model)
        == head_dim(cfg)
        == (getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads)
    )


def test_peft_wrapped_model_is_seen_through():
    model = tiny_causal_lm(num_hidden_layers=2)
    peft_model = get_peft_model(model, LoraConfig(r=2, target_modules=["q_proj"]))
    assert base_model(peft_model) is model and base_model(model) is model
    assert len(decoder_blocks(peft_model)) == 2


def test_multimodal_style_config_returns_its_text_config():
    class Text:
        num_hidden_layers, hidden_size, num_attention_heads, head_dim = 2, 64, 4, None

    class Outer:
        def get_text_config(self):
            return Text()

    assert isinstance(text_config(Outer()), Text) and head_dim(Outer()) == 16


def test_model_without_blocks_or_config_is_refused():
    with pytest.raises(ValueError, match=r"model_or_config=Linear has no \.config"):
        text_config(nn.Linear(2, 2))
    model = tiny_causal_lm(num_hidden_layers=2)
    model.config.num_hidden_layers = 5
    with pytest.raises(ValueError, match=r"no recognizable decoder blocks.*num_hidden_layers=5"):
        find_decoder_blocks(model)
