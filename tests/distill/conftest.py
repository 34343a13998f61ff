"""Helpers for the distill tests: a scripted teacher whose rewrites are known exactly."""

import pytest
import torch
from torch import nn

from prune_peft.testing import tiny_config


class ScriptedTeacher(nn.Module):
    """Stands in for a causal LM: ``generate`` answers each prompt from a script and records every call.

    ``script(prompt_text) -> reply`` picks the reply; the reply is tokenized and appended after the (left-padded)
    prompt, padded with pad tokens — exactly the shape contract of ``model.generate``.
    """

    def __init__(self, tokenizer, script, fail_on_call: int | None = None):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1))
        self.config = tiny_config()
        self.generation_config = None
        self.tokenizer = tokenizer
        self.script = script
        self.calls: list[dict] = []
        self.fail_on_call = fail_on_call

    def generate(self, input_ids, attention_mask, pad_token_id, **kwargs):
        if self.fail_on_call is not None and len(self.calls) + 1 == self.fail_on_call:
            raise RuntimeError("simulated crash inside generate")
        self.calls.append({"input_ids": input_ids.clone(), "attention_mask": attention_mask.clone(), **kwargs})
        replies = []
        for row, mask in zip(input_ids, attention_mask):
            text = self.tokenizer.decode(row[mask.bool()], skip_special_tokens=False)
            replies.append(self.tokenizer(self.script(text), add_special_tokens=False)["input_ids"])
        width = max(len(r) for r in replies)
        tail = torch.full((len(replies), width), pad_token_id, dtype=torch.long)
        for i, r in enumerate(replies):
            tail[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return torch.cat([input_ids, tail], dim=1)


@pytest.fixture
def scripted():
    """Factory: scripted(tokenizer, script, fail_on_call=None) → ScriptedTeacher."""
    return ScriptedTeacher
