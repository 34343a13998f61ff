import torch

from prune_peft.sparsity import InputStats, magnitude_scores, wanda_scores


def test_wanda_matches_hand_formula():
    g = torch.Generator().manual_seed(0)
    W = torch.randn(5, 7, generator=g)
    X = torch.randn(3, 11, 7, generator=g)  # batch, tokens, features
    stats = InputStats(7)
    for x in X:  # streamed in batches of different sizes
        stats.add(x[:4])
        stats.add(x[4:])
    S = wanda_scores(W, stats.sq_mean)
    tokens = X.reshape(-1, 7)
    for i in range(5):
        for j in range(7):
            norm_j = sum(float(t[j]) ** 2 for t in tokens) ** 0.5  # ‖X_j‖₂ over all tokens
            expected = abs(float(W[i, j])) * norm_j / tokens.shape[0] ** 0.5
            assert abs(float(S[i, j]) - expected) < 1e-5


def test_input_stats_hessian_running_mean():
    g = torch.Generator().manual_seed(1)
    X = torch.randn(40, 6, generator=g)
    stats = InputStats(6, hessian=True)
    for chunk in X.split([5, 17, 1, 17]):
        stats.add(chunk)
    assert stats.tokens == 40
    torch.testing.assert_close(stats.H, 2 * X.T @ X / 40, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.sq_mean, (X**2).mean(0), rtol=1e-5, atol=1e-6)


def test_magnitude():
    W = torch.tensor([[-2.0, 1.0]])
    assert magnitude_scores(W).tolist() == [[2.0, 1.0]]
