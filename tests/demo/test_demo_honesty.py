"""What the demo prints is what happened: budget cuts said, no "recovery" at learning rate 0, no one-point curves."""

import torch

from prune_peft.demo.sparse_lora import _plot_losses, _time_budget, result_line, training_summary


def test_a_budget_cut_is_said_on_the_console_and_in_the_report(capsys):
    summary = training_summary(steps=3, planned=60, lrs=[0.0, 2.5e-4, 5e-4], stopped_early=True, budget_s=30)
    out = capsys.readouterr().out
    assert "sparse_lora: cut by its time budget (30s) after 3 of 60 planned steps" in out
    assert summary["time_budget_cut"] and summary["effective_steps"] == 2
    # not cut: nothing said
    assert training_summary(2, 2, [5e-4, 5e-4], False, 30)["time_budget_cut"] is None
    assert "time budget" not in capsys.readouterr().out


def test_no_recovery_is_claimed_when_every_step_ran_at_learning_rate_zero():
    summary = training_summary(steps=1, planned=2, lrs=[0.0], stopped_early=True, budget_s=30)
    line, recovered = result_line(summary, dense=20.0, pruned=60.0, after=60.0)
    assert recovered is None
    assert "recovered" not in line and "no recovery" in line and "learning rate" in line
    summary = training_summary(steps=2, planned=2, lrs=[5e-4, 5e-4], stopped_early=False, budget_s=30)
    line, recovered = result_line(summary, dense=20.0, pruned=60.0, after=41.5)
    assert recovered == 41.5 and "after 2 SparseLoRA step(s) 41.50, -18.50 vs 2:4" in line


def test_one_point_loss_curve_is_not_drawn(tmp_path):
    one = [{"step": 1, "loss": 3.2}, {"step": 1, "train_runtime": 1.0}]
    assert _plot_losses(one, tmp_path / "one.png", "t") is None and not (tmp_path / "one.png").exists()
    two = [{"step": 1, "loss": 3.2}, {"step": 2, "loss": 3.0}]
    assert _plot_losses(two, tmp_path / "two.png", "t") == tmp_path / "two.png"
    assert (tmp_path / "two.png").stat().st_size > 1000


def test_time_budget_records_the_learning_rate_of_each_step():
    cb = _time_budget(1e9)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.0)
    cb.on_step_begin(None, None, None, optimizer=opt)
    opt.param_groups[0]["lr"] = 1e-3
    cb.on_step_begin(None, None, None, optimizer=opt)
    assert cb.lrs == [0.0, 1e-3] and not cb.stopped_early
