"""LoRAPrune's pure math against independent oracles (arXiv 2305.18403; methods.md §1)."""

import pytest
import torch

from prune_peft.sparsity.loraprune import (
    channel_scores,
    estimate_weight_grad,
    grad_importance,
    lora_importance,
    moving_average,
    n_pruned,
    normalize_scores,
    prune_lowest,
)
from prune_peft.sparsity.masks import gqa_unit_scores


def _lora_grads(seed=0, d_out=6, d_in=5, r=2):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(d_out, d_in, generator=g)
    A = torch.randn(r, d_in, generator=g, requires_grad=True)
    B = torch.randn(d_out, r, generator=g, requires_grad=True)
    x = torch.randn(7, d_in, generator=g)
    y = torch.randn(7, d_out, generator=g)
    s = 0.5
    loss = ((x @ (W + s * B @ A).T - y) ** 2).mean()
    loss.backward()
    return W, A.detach(), B.detach(), A.grad, B.grad, s


def test_gradient_estimate_is_one_sgd_step_of_the_lora_product():
    _W, A, B, gA, gB, _ = _lora_grads()
    # B' = B − G_B, A' = A − G_A  ⇒  B'A' − BA = −(G_B A + B G_A − G_B G_A)
    oracle = -((B - gB) @ (A - gA) - B @ A)
    torch.testing.assert_close(estimate_weight_grad(A, B, gA, gB), oracle, rtol=1e-5, atol=1e-6)
    # and written term by term
    terms = gB @ A + B @ gA - gB @ gA
    torch.testing.assert_close(estimate_weight_grad(A, B, gA, gB), terms, rtol=1e-5, atol=1e-6)


def test_importance_by_hand_on_a_tiny_layer():
    W = torch.tensor([[1.0, -2.0], [0.5, 0.0]])
    A = torch.tensor([[1.0, 1.0]])  # r = 1
    B = torch.tensor([[2.0], [-1.0]])
    gA = torch.tensor([[0.1, -0.2]])
    gB = torch.tensor([[0.3], [0.0]])
    s = 2.0
    # Ĝ_ij = gB_i A_j + B_i gA_j − gB_i gA_j ; merged_ij = W_ij + s B_i A_j
    expect = torch.empty(2, 2)
    for i in range(2):
        for j in range(2):
            g_hat = gB[i, 0] * A[0, j] + B[i, 0] * gA[0, j] - gB[i, 0] * gA[0, j]
            merged = W[i, j] + s * B[i, 0] * A[0, j]
            expect[i, j] = abs(g_hat * merged)
    torch.testing.assert_close(lora_importance(W, A, B, gA, gB, s), expect)
    torch.testing.assert_close(channel_scores(W, A, B, s, grad_A=gA, grad_B=gB, axis="out"), expect.sum(1))
    torch.testing.assert_close(channel_scores(W, A, B, s, grad_A=gA, grad_B=gB, axis="in"), expect.sum(0))
    with pytest.raises(ValueError, match="axis"):
        channel_scores(W, A, B, s, grad_A=gA, grad_B=gB, axis="rows")


def test_grad_importance_uses_the_true_gradient():
    W, A, B, _gA, _gB, s = _lora_grads(1)
    G = torch.randn_like(W)
    torch.testing.assert_close(grad_importance(W, G, A, B, s), (G * (W + s * B @ A)).abs())
    torch.testing.assert_close(grad_importance(W, G), (G * W).abs())


def test_gqa_units_group_query_heads_with_their_kv_head():
    # 4 query heads of dim 2 over 2 KV heads: query heads 0,1 → unit 0; 2,3 → unit 1 (transformers' repeat_kv)
    head_dim, n_heads, n_kv = 2, 4, 2
    rows = torch.arange(n_heads * head_dim, dtype=torch.float32)  # score of row i = i
    units = gqa_unit_scores(rows, n_kv, head_dim=head_dim)
    expect = torch.zeros(n_kv)
    for row in range(n_heads * head_dim):
        head = row // head_dim
        expect[head // (n_heads // n_kv)] += rows[row]
    torch.testing.assert_close(units, expect)
    # k/v: one unit per KV head
    torch.testing.assert_close(gqa_unit_scores(torch.ones(4), n_kv, head_dim=head_dim), torch.tensor([2.0, 2.0]))
    with pytest.raises(ValueError, match="whole heads"):
        gqa_unit_scores(torch.ones(6), 2, head_dim=4)


def test_normalize_and_moving_average():
    v = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(normalize_scores(v), torch.tensor([0.6, 0.8]))
    # the reference's update_sensitivity_dict: Ī starts at zero, so the first observation enters with weight 0.1
    first = moving_average(None, v, 0.9)
    torch.testing.assert_close(first, torch.tensor([0.3, 0.4]))
    torch.testing.assert_close(moving_average(first, torch.tensor([13.0, 14.0]), 0.9), torch.tensor([1.57, 1.76]))
    # the running average is a new tensor: the caller can still keep the old one (skipped updates)
    moving_average(first, torch.tensor([1.0, 1.0]), 0.9)
    torch.testing.assert_close(first, torch.tensor([0.3, 0.4]))


@pytest.mark.parametrize("p,n,expect", [(0.5, 32, 16), (0.5, 3, 2), (0.2, 3, 1), (0.1, 3, 0), (0.3, 10, 3), (0, 9, 0)])
def test_group_count_rounds_to_nearest(p, n, expect):
    assert n_pruned(p, n) == expect


def test_prune_lowest_is_monotone_and_breaks_ties_by_index():
    scores = torch.tensor([0.5, 0.1, 0.1, 0.9, 0.1])
    mask = torch.ones(5, dtype=torch.bool)
    m1 = prune_lowest(scores, mask, 2)
    assert m1.tolist() == [True, True, False, True, False]  # equal scores: the lower index survives
    # an already-pruned group stays pruned even if it now scores highest
    m2 = prune_lowest(torch.tensor([0.5, 0.1, 5.0, 0.9, 0.2]), m1, 3)
    assert m2.tolist() == [True, False, False, True, False]
    # asking for fewer than are already pruned never revives anything
    assert prune_lowest(scores, m2, 1).tolist() == m2.tolist()
    # batched rows (N:M groups)
    rows = prune_lowest(torch.tensor([[4.0, 3, 2, 1], [1, 2, 3, 4]]), torch.ones(2, 4, dtype=torch.bool), 2)
    assert rows.tolist() == [[True, True, False, False], [False, False, True, True]]


@pytest.mark.parametrize("axis", ["out", "in"])
def test_chunked_channel_scores_equal_the_full_computation(axis):
    W, A, B, gA, gB, s = _lora_grads(2, d_out=37, d_in=11, r=3)
    dim = 1 if axis == "out" else 0
    for chunk in (1, 5, 128):
        got = channel_scores(W, A, B, s, grad_A=gA, grad_B=gB, axis=axis, chunk=chunk)
        torch.testing.assert_close(got, lora_importance(W, A, B, gA, gB, s).sum(dim), rtol=1e-5, atol=1e-6)
        G = torch.randn_like(W)
        torch.testing.assert_close(
            channel_scores(W, A, B, s, grad_W=G, axis=axis, chunk=chunk), grad_importance(W, G, A, B, s).sum(dim)
        )
        torch.testing.assert_close(
            channel_scores(W, A, B, s, axis=axis, chunk=chunk), (W + s * B @ A).abs().sum(dim), rtol=1e-5, atol=1e-6
        )
