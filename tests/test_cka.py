"""linear_cka (experiments/cka.py) against its defining properties and a direct HSIC formula."""

from __future__ import annotations

import pytest
import torch

from experiments.cka import linear_cka


def hsic(k: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741 - the paper's names
    """Gretton's biased HSIC estimator: tr(K H L H) / (n - 1)², H = I - 11ᵀ/n."""
    n = k.shape[0]
    h = torch.eye(n, dtype=torch.float64) - torch.full((n, n), 1.0 / n, dtype=torch.float64)
    return torch.trace(k @ h @ l @ h) / (n - 1) ** 2


def random_pair(n: int = 64, dx: int = 20, dy: int = 12, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=gen, dtype=torch.float64)
    y = x[:, :dy] @ torch.randn(dy, dy, generator=gen, dtype=torch.float64) + torch.randn(
        n, dy, generator=gen, dtype=torch.float64
    )
    return x, y


def test_identical_inputs_give_one_and_it_is_symmetric():
    x, y = random_pair()
    assert linear_cka(x, x) == pytest.approx(1.0, abs=1e-12)
    assert linear_cka(x, y) == pytest.approx(linear_cka(y, x), abs=1e-12)
    assert 0.0 < linear_cka(x, y) < 1.0


def test_equals_the_hsic_formula():
    for seed in range(3):
        x, y = random_pair(seed=seed)
        k, l = x @ x.T, y @ y.T  # noqa: E741
        direct = hsic(k, l) / torch.sqrt(hsic(k, k) * hsic(l, l))
        assert linear_cka(x, y) == pytest.approx(direct.item(), abs=1e-10)


def test_invariant_to_rotation_and_isotropic_scaling_but_not_to_a_general_linear_map():
    x, y = random_pair()
    gen = torch.Generator().manual_seed(5)
    rotation, _ = torch.linalg.qr(torch.randn(x.shape[1], x.shape[1], generator=gen, dtype=torch.float64))
    reference = linear_cka(x, y)
    assert linear_cka(x @ rotation, y) == pytest.approx(reference, abs=1e-10)
    assert linear_cka(x, 7.5 * y) == pytest.approx(reference, abs=1e-10)
    stretch = torch.diag(torch.logspace(-2, 2, x.shape[1], dtype=torch.float64))  # invertible, not orthogonal
    assert abs(linear_cka(x @ stretch, y) - reference) > 1e-2


def test_bad_shapes_and_constant_inputs_are_refused():
    x, y = random_pair()
    with pytest.raises(ValueError, match="same n"):
        linear_cka(x, y[:-1])
    with pytest.raises(ValueError, match="constant"):
        linear_cka(torch.ones(8, 3), x[:8])


def test_cka_matrix_equals_pairwise_linear_cka():
    from experiments.cka import cka_matrix, cross_block_mean

    gen = torch.Generator().manual_seed(2)
    a = [torch.randn(40, 16, generator=gen) for _ in range(3)]
    b = [a[0] @ torch.randn(16, 24, generator=gen), torch.randn(40, 8, generator=gen)]
    matrix = cka_matrix(a, b)
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            assert matrix[i][j] == pytest.approx(linear_cka(x, y), abs=1e-12)
    within = cka_matrix(a, a)
    assert [within[i][i] for i in range(3)] == pytest.approx([1.0] * 3, abs=1e-12)
    assert cross_block_mean(within) == pytest.approx((within[0][1] + within[0][2] + within[1][2]) / 3)


@pytest.mark.slow
def test_cli_within_and_between_models_on_a_run_and_its_base(tmp_path, tiny_ckpt, tokenizer_dir):
    import json

    from experiments import cka
    from tests.conftest import DATA_DIR, run_paths
    from train.cli import entry

    runs = tmp_path / "runs"
    flags = [
        "--task",
        "sst",
        *run_paths(tiny_ckpt[0], tokenizer_dir, runs),
        "--use_lora",
        "--train_limit",
        "32",
        "--lr",
        "0.05",
    ]
    assert entry.main([*flags, "--dev_limit", "8", "--test_limit", "2", "--epochs", "1", "--wandb", "disabled"]) == 0
    (run,) = [p for p in runs.iterdir() if p.is_dir()]
    inputs = ["--tokenizer", str(tokenizer_dir), "--data_dir", str(DATA_DIR), "--device", "cpu"]
    out = tmp_path / "cka"
    assert cka.main([str(run), str(tiny_ckpt[0]), "--task", "sst", "--n", "24", "--out", str(out), *inputs]) == 0
    result = json.loads((out / "cka.json").read_text())
    assert result["n"] == 24 and result["layers_a"] == [0, 1] == result["layers_b"]
    for pooling in ("last_token", "mean"):
        matrices = result["cka"][pooling]
        assert set(matrices) == {"within_a", "within_b", "between"}
        assert [matrices["within_a"][i][i] for i in range(2)] == pytest.approx([1.0, 1.0], abs=1e-9)
        assert result["summary"][pooling]["a_cross_block_mean"] == pytest.approx(matrices["within_a"][0][1])
        # 4 LoRA steps at lr 0.05 move the run's blocks away from the base's (identical models give 1)
        assert 0.0 < result["summary"][pooling]["between_diagonal_mean"] < 1.0 - 1e-6
    assert (out / "cka.png").stat().st_size > 10_000
    # One model against itself: the between matrix is the within matrix.
    same = tmp_path / "same"
    assert cka.main([str(run), str(run), "--layers", "0", "1", "--n", "24", "--out", str(same), *inputs]) == 0
    again = json.loads((same / "cka.json").read_text())["cka"]["mean"]
    assert torch.allclose(torch.tensor(again["between"]), torch.tensor(again["within_a"]), atol=1e-9, rtol=0)
    with pytest.raises(SystemExit):
        cka.main([str(run), "--layers", "2", "--out", str(same), *inputs])
