import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prune_peft.sparsity import (
    NMPattern,
    global_masks,
    gqa_unit_scores,
    group_mask,
    is_nm_sparse,
    nm_mask,
    nm_violations,
    parse_pattern,
    unstructured_mask,
)
from prune_peft.sparsity.masks import describe_pattern, mask_mismatch, top2of4_mask

shapes = st.tuples(st.integers(1, 12), st.integers(1, 6).map(lambda k: 4 * k))
ratios = st.floats(0.0, 0.99, allow_nan=False)


def _scores(shape, seed, ties=False):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(*shape, generator=g)
    return s.round() if ties else s  # rounding makes many exact ties


@settings(max_examples=60, deadline=None)
@given(shape=shapes, sp=ratios, seed=st.integers(0, 10_000), ties=st.booleans())
def test_unstructured_row_exact_counts(shape, sp, seed, ties):
    s = _scores(shape, seed, ties)
    m = unstructured_mask(s, sp, "row")
    assert m.dtype == torch.bool
    n_prune = int(sp * shape[1])
    assert ((~m).sum(1) == n_prune).all()
    # every kept score >= every pruned score in the same row
    for row, keep in zip(s, m):
        if keep.any() and (~keep).any():
            assert row[keep].min() >= row[~keep].max()


@settings(max_examples=60, deadline=None)
@given(shape=shapes, sp=ratios, seed=st.integers(0, 10_000))
def test_unstructured_layer_exact_counts(shape, sp, seed):
    s = _scores(shape, seed, ties=True)
    m = unstructured_mask(s, sp, "layer")
    assert int((~m).sum()) == int(sp * s.numel())


@settings(max_examples=60, deadline=None)
@given(
    shape=shapes,
    seed=st.integers(0, 10_000),
    nm=st.sampled_from([(2, 4), (1, 4), (3, 4), (4, 8), (2, 8)]),
    ties=st.booleans(),
)
def test_nm_mask_validity(shape, seed, nm, ties):
    n, m = nm
    rows, cols = shape[0], shape[1] * (2 if m == 8 else 1)
    s = _scores((rows, cols), seed, ties)
    mask = nm_mask(s, n, m)
    groups = mask.reshape(-1, m)
    assert (groups.sum(1) == n).all()  # exactly N kept per group
    w = torch.randn(rows, cols) * mask
    assert is_nm_sparse(w, n, m)
    assert nm_violations(w, n, m) == 0
    # kept scores dominate pruned ones within each group
    sg = s.reshape(-1, m)
    for sc, kp in zip(sg, groups):
        assert sc[kp].min() >= sc[~kp].max()


def test_ties_keep_lower_index():
    s = torch.zeros(1, 8)
    assert nm_mask(s, 2, 4).tolist() == [[True, True, False, False, True, True, False, False]]
    assert unstructured_mask(s, 0.25, "row").tolist() == [[True] * 6 + [False] * 2]
    assert group_mask(torch.tensor([1.0, 1.0, 1.0]), 1).tolist() == [True, True, False]


def test_global_masks_single_threshold():
    a = torch.tensor([[0.1, 5.0], [3.0, 0.2]])
    b = torch.tensor([[4.0, 0.3, 2.0, 0.05]])
    m = global_masks({"a": a, "b": b}, 0.5)
    assert int(sum((~v).sum() for v in m.values())) == 4
    assert m["a"].tolist() == [[False, True], [True, False]]
    assert m["b"].tolist() == [[True, False, True, False]]


def test_group_mask():
    m = group_mask(torch.tensor([3.0, 1.0, 2.0, 0.5]), 2)
    assert m.tolist() == [True, False, True, False]
    with pytest.raises(ValueError, match="n_prune"):
        group_mask(torch.ones(3), 4)


def test_gqa_units_group_query_heads_by_kv_head():
    q = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])  # 6 query heads, 2 KV heads → 3 per group
    assert gqa_unit_scores(q, 2).tolist() == [6.0, 15.0]
    assert gqa_unit_scores(q, 2, torch.tensor([1.0, -1.0])).tolist() == [7.0, 14.0]
    with pytest.raises(ValueError, match="num_kv_heads"):
        gqa_unit_scores(q, 4)


@pytest.mark.parametrize("bad", ["3:2", "2:2", "0:4", "a:b", "2-4", "", 24])
def test_parse_pattern_rejects(bad):
    with pytest.raises(ValueError, match="pattern"):
        parse_pattern(bad)


def test_parse_pattern_accepts():
    assert parse_pattern("unstructured") is None
    assert parse_pattern(None) is None
    assert parse_pattern(" 2:4 ") == NMPattern(2, 4)
    assert parse_pattern("1:4").sparsity == 0.75


def test_nm_mask_width_not_divisible():
    with pytest.raises(ValueError, match="divisible by 3"):
        nm_mask(torch.randn(2, 8), 2, 3)


@pytest.mark.parametrize("sp", [-0.1, 1.0, 1.5, float("nan"), "0.5", True])
def test_sparsity_validation(sp):
    with pytest.raises(ValueError, match="sparsity"):
        unstructured_mask(torch.randn(2, 4), sp)


def test_stats():
    w = torch.tensor([[1.0, 0.0, 2.0, 0.0], [1.0, 1.0, 1.0, 0.0]])
    assert nm_violations(w, 2, 4) == 1
    assert not is_nm_sparse(w, 2, 4)
    assert is_nm_sparse(w, 3, 4)


def test_describe_pattern():
    scores = torch.randn(8, 16)
    assert describe_pattern([nm_mask(scores, 2, 4)]) == "2:4"
    assert describe_pattern([nm_mask(scores, 1, 4)]) == "1:4"
    assert describe_pattern([torch.rand(8, 16) > 0.5, nm_mask(scores, 2, 4)]) in ("unstructured", "4:8")
    assert describe_pattern([]) == "unstructured"
    assert describe_pattern([nm_mask(scores, 2, 4), nm_mask(scores, 4, 8)]) == "4:8"


def test_describe_pattern_reads_a_generator_to_the_end():
    scores = torch.randn(8, 16)
    seen = []

    def masks():
        for m in (torch.ones(8, 16, dtype=torch.bool), nm_mask(scores, 2, 4)):
            seen.append(m)
            yield m

    assert describe_pattern(masks()) == "unstructured"
    assert len(seen) == 2  # the caller's per-mask accounting still sees every mask


@settings(max_examples=60, deadline=None)
@given(shape=shapes, seed=st.integers(0, 10_000), ties=st.booleans())
def test_top2of4_equals_nm_mask(shape, seed, ties):
    s = _scores(shape, seed, ties)
    for dtype in (torch.float32, torch.float64, torch.float16):
        assert torch.equal(top2of4_mask(s.to(dtype)), nm_mask(s.to(dtype), 2, 4))
    with pytest.raises(ValueError, match="divisible by 4"):
        top2of4_mask(torch.randn(2, 6))


def test_mask_mismatch():
    mask = torch.tensor([[True, False], [True, True]])
    w = torch.tensor([[1.0, 0.0], [2.0, 0.0]])
    assert mask_mismatch(w, mask, nnz=2) is None
    assert mask_mismatch(w, mask, nnz=None) is None
    assert "mask shape" in mask_mismatch(w, mask[:1], nnz=2)
    assert "1 non-zero weights where the adapter's mask is zero" in mask_mismatch(w + 1.0, mask, nnz=2)
    assert "the adapter was made for 3" in mask_mismatch(w, mask, nnz=3)
