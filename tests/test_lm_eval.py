"""prune_peft.evaluation.lm_eval: lm-evaluation-harness on in-memory models, local YAML tasks, offline."""

import json

import pytest
import torch
from peft import get_peft_model

from prune_peft import LoRAPruneConfig
from prune_peft.evaluation import lm_eval, resolve_tasks
from prune_peft.testing import byte_tokenizer, tiny_causal_lm

pytest.importorskip("lm_eval", reason="the [eval] extra (make setup installs it)")

QUESTIONS = [
    ("The sky is", [" blue", " green", " loud"], 0),
    ("Two plus two is", [" four", " five", " six"], 0),
    ("Fire is", [" cold", " hot", " wet"], 1),
    ("Snow is", [" black", " red", " white"], 2),
    ("The sun rises in the", [" east", " west", " north"], 0),
    ("Fish live in", [" trees", " water", " sand"], 1),
]


def local_task(tmp_path, name="pp_tiny_mc"):
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"q": q, "choices": c, "label": a}) + "\n" for q, c, a in QUESTIONS))
    task = tmp_path / "task" / f"{name}.yaml"
    task.parent.mkdir()
    task.write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{label}}"\n'
        "metric_list:\n  - metric: acc\n  - metric: acc_norm\n"
    )
    return str(task)


def test_resolve_tasks(tmp_path):
    task = local_task(tmp_path)
    assert resolve_tasks(f"arc_easy,{task}") == (["arc_easy", "pp_tiny_mc"], [str(tmp_path / "task")])
    for bad, match in (([], "non-empty"), ("missing.yaml", "does not exist"), (str(tmp_path), "names no task")):
        with pytest.raises(ValueError, match=match):
            resolve_tasks(bad)


def test_in_memory_scores_equal_lm_eval_hf_on_the_exported_checkpoint(tmp_path):
    """A LoRAPrune adapter attached in memory vs lm-eval's own `--model hf` loader on the merged export."""
    import lm_eval as harness

    from prune_peft.hub import export

    task = local_task(tmp_path)
    tok = byte_tokenizer()
    model = get_peft_model(tiny_causal_lm(num_hidden_layers=2), LoRAPruneConfig(r=4, exclude_layers=[1]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    model.base_model.set_block_masks(0, units=torch.tensor([True, False]), channels=torch.arange(128) < 64)
    ours = lm_eval(model, tok, [task], output=str(tmp_path / "ours.json"))
    assert json.loads((tmp_path / "ours.json").read_text())["results"] == ours["results"]
    export(model, tmp_path / "merged", format="merged", tokenizer=tok)
    from lm_eval.tasks import TaskManager

    theirs = harness.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'merged'},dtype=float32",
        tasks=["pp_tiny_mc"],
        task_manager=TaskManager(include_path=str(tmp_path / "task")),
        batch_size=8,
        device="cpu",
        log_samples=False,
    )
    mine, ref = ours["results"]["pp_tiny_mc"], theirs["results"]["pp_tiny_mc"]
    assert ours["n-samples"]["pp_tiny_mc"]["effective"] == len(QUESTIONS)
    for metric in ("acc,none", "acc_norm,none"):
        assert mine[metric] == pytest.approx(ref[metric], abs=1e-9), metric


def test_lm_eval_missing_gives_one_line(monkeypatch):
    import builtins

    from prune_peft import evaluation

    real = builtins.__import__

    def no_lm_eval(name, *args, **kwargs):
        if name == "lm_eval" or name.startswith("lm_eval."):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_lm_eval)
    with pytest.raises(ImportError, match=r"pip install 'prune-peft\[eval\]'"):
        evaluation._import_lm_eval()


@pytest.mark.slow
def test_embedded_model_in_memory_scores_equal_lm_eval_hf_on_the_compacted_export(tmp_path):
    """The embedded SmolLM2-135M with a uniform LoRAPrune adapter (same kept heads/channels in every block): the
    in-memory scores equal lm-eval's own `--model hf` loader on the stock compacted export."""
    import lm_eval as harness
    from lm_eval.tasks import TaskManager

    from prune_peft.hub import export, stock_reload
    from prune_peft.models import load_model_and_tokenizer

    task = local_task(tmp_path, name="pp_embedded_mc")
    base, tok = load_model_and_tokenizer()  # offline
    model = get_peft_model(base, LoRAPruneConfig(r=4, uniform=True, target_sparsity=0.3))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.01, generator=torch.Generator().manual_seed(1))
    n_kv, width = base.config.num_key_value_heads, base.config.intermediate_size
    for block in model.base_model.prune_blocks():
        model.base_model.set_block_masks(
            block.index, units=torch.arange(n_kv) != block.index % n_kv, channels=torch.arange(width) < width - 512
        )
    ours = lm_eval(model, tok, [task], batch_size=8)
    info = export(model, tmp_path / "small", format="compacted", tokenizer=tok)
    assert info["intermediate_size"] == width - 512 and info["num_key_value_heads"] == n_kv - 1
    theirs = harness.simple_evaluate(
        model="hf",
        model_args=f"pretrained={tmp_path / 'small'},dtype=float32",
        tasks=["pp_embedded_mc"],
        task_manager=TaskManager(include_path=str(tmp_path / "task")),
        batch_size=8,
        device="cpu",
        log_samples=False,
    )
    mine, ref = ours["results"]["pp_embedded_mc"], theirs["results"]["pp_embedded_mc"]
    assert ours["n-samples"]["pp_embedded_mc"]["effective"] == len(QUESTIONS)
    # 6 accuracies could agree by chance: the scores come from equal logits (stock reload in a fresh process)
    ids = tok("The sun rises in the east and sets in the west", return_tensors="pt").input_ids
    with torch.no_grad():
        expected = model(input_ids=ids).logits.float()
    reloaded = stock_reload(tmp_path / "small", ids)["logits"]
    assert (reloaded - expected).abs().max() <= 2e-3  # fp32: unmerged masked adapter vs merged, compacted weights
    for metric in ("acc,none", "acc_norm,none"):
        assert mine[metric] == pytest.approx(ref[metric], abs=1e-9), metric
