"""docs/architecture.md's example method runs as written: its code block, executed, prunes a tiny model to target."""

import re
from pathlib import Path

import pytest
import torch

DOC = Path(__file__).resolve().parents[1] / "docs" / "architecture.md"


def _example_source() -> str:
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), flags=re.S)
    assert len(blocks) == 1, "docs/architecture.md should hold exactly one python block: the example method"
    return blocks[0]


def test_the_documented_example_method_prunes_to_target_with_the_trainer(tmp_path):
    from transformers import Trainer, TrainingArguments

    from prune_peft import PruneCallback
    from prune_peft.callbacks.drivers import DRIVERS
    from prune_peft.testing import tiny_causal_lm

    namespace: dict = {}
    exec(compile(_example_source(), str(DOC), "exec"), namespace)
    assert DRIVERS["movement"] is namespace["MovementDriver"]
    scores = namespace["movement_scores"](torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5]))
    assert torch.equal(scores, torch.tensor([-0.5, 1.0]))  # S = −W ⊙ G

    model = tiny_causal_lm(seed=0, num_hidden_layers=2)
    g = torch.Generator().manual_seed(0)
    rows = [
        {"input_ids": (ids := torch.randint(3, 259, (16,), generator=g).tolist()), "labels": ids} for _ in range(16)
    ]
    args = TrainingArguments(
        output_dir=str(tmp_path), per_device_train_batch_size=4, max_steps=4, learning_rate=1e-3, report_to=[],
        save_strategy="no", use_cpu=True, disable_tqdm=True, seed=0,
    )  # fmt: skip
    callback = PruneCallback(method="movement", target_sparsity=0.5)
    try:
        Trainer(model=model, args=args, train_dataset=rows, callbacks=[callback]).train()
    finally:
        DRIVERS.pop("movement", None)
    (driver,) = callback.drivers
    assert driver.layers, "the example found no linear layers"
    for name, layer in driver.layers.items():
        zeros = (layer.weight == 0).float().mean().item()
        assert zeros == pytest.approx(0.5, abs=1.0 / layer.weight.numel()), name
        assert torch.equal(layer.weight != 0, driver.masks[name]), name
