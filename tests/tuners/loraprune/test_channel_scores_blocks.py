"""channel_scores on row blocks: chunked = one pass, and a block of rows scored alone = those rows of the whole layer
(what each FSDP2 rank computes on its shard)."""

import pytest
import torch

from prune_peft.sparsity.loraprune import channel_scores, lora_importance


def _layer(d_out=10, d_in=7, r=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    W, A, B = (
        torch.randn(d_out, d_in, generator=g),
        torch.randn(r, d_in, generator=g),
        torch.randn(d_out, r, generator=g),
    )
    return (
        W,
        A,
        B,
        torch.randn(r, d_in, generator=g),
        torch.randn(d_out, r, generator=g),
        torch.randn(d_out, d_in, generator=g),
    )


@pytest.mark.parametrize("mode", ["lora", "grad", "magnitude"])
@pytest.mark.parametrize("axis", ["out", "in"])
def test_chunked_equals_one_pass_and_the_oracle(mode, axis):
    W, A, B, gA, gB, gW = _layer()
    kw = {"lora": dict(grad_A=gA, grad_B=gB), "grad": dict(grad_W=gW), "magnitude": {}}[mode]
    merged = W + 0.5 * B @ A
    elem = {"lora": lora_importance(W, A, B, gA, gB, 0.5), "grad": (gW * merged).abs(), "magnitude": merged.abs()}[
        mode
    ]
    oracle = elem.sum(1 if axis == "out" else 0)
    whole = channel_scores(W, A, B, 0.5, axis=axis, **kw)
    torch.testing.assert_close(whole, oracle, rtol=1e-5, atol=1e-6)
    for chunk in (1, 3, 4):
        torch.testing.assert_close(
            channel_scores(W, A, B, 0.5, axis=axis, chunk=chunk, **kw), whole, rtol=1e-6, atol=1e-6
        )


def test_a_block_of_rows_scores_like_those_rows_of_the_whole_layer():
    W, A, B, gA, gB, _ = _layer(d_out=12)
    rows = channel_scores(W, A, B, 0.5, grad_A=gA, grad_B=gB, axis="out")
    cols = channel_scores(W, A, B, 0.5, grad_A=gA, grad_B=gB, axis="in")
    parts = [(0, 6), (6, 12)]  # two ranks' shards: the whole A and dL/dA, the shard's rows of W, B and dL/dB
    got_rows = torch.cat(
        [channel_scores(W[a:b], A, B[a:b], 0.5, grad_A=gA, grad_B=gB[a:b], axis="out") for a, b in parts]
    )
    assert torch.equal(got_rows, rows)  # row scores: bitwise
    got_cols = sum(channel_scores(W[a:b], A, B[a:b], 0.5, grad_A=gA, grad_B=gB[a:b], axis="in") for a, b in parts)
    torch.testing.assert_close(got_cols, cols, rtol=1e-6, atol=0)  # column sums: the order of one addition differs
    empty = channel_scores(W[:0], A, B[:0], 0.5, grad_A=gA, grad_B=gB[:0], axis="in")
    assert torch.equal(empty, torch.zeros(W.shape[1]))  # a rank holding no rows contributes zeros
