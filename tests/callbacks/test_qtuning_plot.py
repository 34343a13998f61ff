"""The EU-plane plot: each step's samples against that step's own thresholds, readable log ticks."""

import pytest
import torch

import prune_peft.callbacks.qtuning as qmod
from prune_peft.callbacks.qtuning import QTuningCallback, QTuningConfig, eu_plane_figure, plot_eu_plane


def _thr(lo, hi):
    return {"ppl_low": lo, "ppl_high": hi, "ent_low": 1.0, "ent_high": 2.0}


def test_each_panel_draws_its_steps_points_against_its_own_thresholds():
    ppl = torch.tensor([3.0, 4.0, 30.0, 40.0, 5.0])
    ent = torch.tensor([1.0, 2.0, 1.5, 2.5, 1.2])
    quad = torch.tensor([3, 4, 2, 1, 3])
    step = torch.tensor([7, 7, 8, 8, 8])
    thresholds = {7: _thr(3.5, 3.9), 8: _thr(6.0, 35.0)}
    fig = eu_plane_figure(ppl, ent, quad, thresholds, step=step)
    axes = fig.axes
    assert len(axes) == 2
    for ax, s in zip(axes, (7, 8)):
        hlines = sorted(line.get_ydata()[0] for line in ax.lines if line.get_ydata()[0] == line.get_ydata()[1])
        assert hlines == sorted([thresholds[s]["ppl_low"], thresholds[s]["ppl_high"]])
        drawn = sorted(float(y) for c in ax.collections for _, y in c.get_offsets())
        assert drawn == sorted(ppl[step == s].tolist())  # only this step's samples


def test_log_ticks_are_readable_numbers():
    fig = eu_plane_figure(torch.tensor([3.0, 7.0, 40.0]), torch.tensor([1.0, 2.0, 3.0]), torch.tensor([3, 4, 2]))
    ax = fig.axes[0]
    fig.canvas.draw()
    lo, hi = ax.get_ylim()
    labels = [t.get_text() for t in ax.get_yticklabels() if lo <= t.get_position()[1] <= hi and t.get_text()]
    assert len(labels) >= 3  # matplotlib's default would label only 10 in 3…40
    assert all(lbl.replace(".", "").isdigit() for lbl in labels), labels


def test_bad_plot_input_is_refused(tmp_path):
    with pytest.raises(ValueError, match="thresholds must map each step"):
        eu_plane_figure([1.0], [1.0], [2], {"ppl_low": 1.0}, step=[0])
    with pytest.raises(ValueError, match="must hold ppl_low"):
        eu_plane_figure([1.0], [1.0], [2], {"ppl_low": 1.0})
    assert plot_eu_plane([2.0, 3.0], [1.0, 2.0], [2, 4], tmp_path / "p.png").endswith("p.png")


def test_callback_hands_the_plot_each_triages_thresholds(tmp_path, monkeypatch):
    cb = QTuningCallback(QTuningConfig(sample_ratio=0.5, token_ratio=1.0, plot_dir=str(tmp_path)))
    torch.manual_seed(0)
    for shift in (0.0, 3.0):  # two steps whose batches sit at different perplexities: different thresholds
        nll = torch.rand(6, 5) + shift
        cb.triage([nll], [torch.rand(6, 5)], [torch.ones(6, 5, dtype=torch.bool)])
    seen = {}
    monkeypatch.setattr(qmod, "plot_eu_plane", lambda *a, **k: seen.update(args=a, kwargs=k))
    cb._plot(type("A", (), {"output_dir": str(tmp_path)})(), 2)
    ppl, _, _, _ = seen["args"]
    step, thresholds = seen["kwargs"]["step"], seen["kwargs"]["thresholds"]
    records = list(cb.records)
    assert sorted(set(step.tolist())) == [1, 2] and len(thresholds) == 2
    for tid, rec in zip((1, 2), records):
        assert thresholds[tid] == rec["thresholds"]  # the thresholds that triage used, not the latest
        torch.testing.assert_close(ppl[step == tid], torch.tensor(rec["log_ppl"], dtype=torch.float64).exp())
    assert thresholds[1]["ppl_high"] < thresholds[2]["ppl_low"]
