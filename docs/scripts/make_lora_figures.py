"""Figures for docs/lora.md: is a fine-tuning update low-rank?

Run: ``python docs/scripts/make_lora_figures.py [--out DIR]`` (default ``docs/figures``). CPU, ~10 s.

How the "trained ΔW" is made (real training, nothing planted):

1. **Pretrain** a small MLP ``64 → 128 → 128 → 10`` (GELU) with Adam on task A: 10-way classification
   whose labels come from a fixed random teacher network. Inputs are anisotropic Gaussians (covariance
   eigenvalues decaying like 1/k), as real features are.
2. **Fine-tune all weights** (no LoRA, no rank constraint) on task B: the same inputs, labels from a
   second teacher that shares task A's first layer but has fresh deeper layers.
3. ΔW = W_finetuned − W_pretrained of the middle 128×128 layer. Its singular values are compared with
   those of a Gaussian random matrix of the same shape and the same Frobenius norm.

Writes ``lora_spectrum.png`` (singular values, largest first) and ``lora_rank_error.png`` (relative
error of the best rank-r approximation vs r; Eckart–Young's tail formula drawn as a line, the measured
error of the truncated SVD as dots).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from torch import nn

D_IN, HIDDEN, CLASSES = 64, 128, 10


def mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(D_IN, HIDDEN), nn.GELU(),
        nn.Linear(HIDDEN, HIDDEN), nn.GELU(),
        nn.Linear(HIDDEN, CLASSES),
    )  # fmt: skip


def inputs(n: int, gen: torch.Generator, mix: torch.Tensor) -> torch.Tensor:
    """Anisotropic Gaussian inputs: standard normals scaled by 1/sqrt(k), then rotated by `mix`."""
    scale = torch.arange(1, D_IN + 1, dtype=torch.float32).rsqrt()
    return (torch.randn(n, D_IN, generator=gen) * scale) @ mix  # (n, D_IN)


def train(model: nn.Module, teacher: nn.Module, mix: torch.Tensor, steps: int, lr: float, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        x = inputs(256, gen, mix)
        with torch.no_grad():
            y = teacher(x).argmax(-1)  # (256,)
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def trained_update() -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (ΔW, W_pretrained) of the middle layer after a real pretrain → full fine-tune run."""
    torch.manual_seed(0)
    mix = torch.linalg.qr(torch.randn(D_IN, D_IN))[0]  # a random rotation of the input axes
    teacher_a, teacher_b, student = mlp(), mlp(), mlp()
    teacher_b[0].load_state_dict(teacher_a[0].state_dict())  # task B shares task A's first layer
    train(student, teacher_a, mix, steps=600, lr=2e-3, seed=1)
    w_pre = student[2].weight.detach().clone()  # (HIDDEN, HIDDEN)
    train(student, teacher_b, mix, steps=300, lr=1e-3, seed=2)
    return student[2].weight.detach() - w_pre, w_pre


def rank_r_error(m: torch.Tensor, ranks: list[int]) -> tuple[list[float], list[float]]:
    """Relative Frobenius error of the best rank-r approximation: measured, and by Eckart–Young."""
    u, s, vh = torch.linalg.svd(m.double(), full_matrices=False)
    norm = s.square().sum().sqrt()
    measured, tail = [], []
    for r in ranks:
        m_r = (u[:, :r] * s[:r]) @ vh[:r]  # truncated SVD
        measured.append(float(torch.linalg.matrix_norm(m.double() - m_r) / norm))
        tail.append(float(s[r:].square().sum().sqrt() / norm))  # sqrt(σ_{r+1}² + ... ) / ‖M‖_F
    return measured, tail


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # Tiny matrices gain nothing from threads, and on a shared CPU extra threads only contend (10× slower
    # measured here); one thread also makes the figures reproducible across machines with different cores.
    torch.set_num_threads(1)

    delta, w_pre = trained_update()
    gen = torch.Generator().manual_seed(3)
    rand = torch.randn(delta.shape, generator=gen)
    rand *= delta.norm() / rand.norm()  # same Frobenius norm as ΔW: a fair comparison
    s_delta = torch.linalg.svdvals(delta.double())
    s_rand = torch.linalg.svdvals(rand.double())
    k = torch.arange(1, len(s_delta) + 1)

    def energy_rank(s: torch.Tensor) -> int:  # smallest r keeping 90% of ‖M‖_F²
        return int((s.square().cumsum(0) / s.square().sum() < 0.9).sum()) + 1

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    r_delta, r_rand = energy_rank(s_delta), energy_rank(s_rand)
    ax.semilogy(k, s_delta, "o-", ms=3, label=rf"trained $\Delta W$ (90% energy in rank {r_delta})")
    ax.semilogy(k, s_rand, "s-", ms=3, label=f"random matrix (90% energy in rank {r_rand})")
    ax.set_xlabel(r"index $i$ (largest first)")
    ax.set_ylabel(r"singular value $\sigma_i$")
    ax.set_title("Singular values: full fine-tuning update vs random\n(128×128 layer, same Frobenius norm)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "lora_spectrum.png", dpi=110)
    plt.close(fig)

    ranks = list(range(0, HIDDEN + 1, 4))
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    named = ((r"trained $\Delta W$", delta, "o"), (r"pretrained $W_0$", w_pre, "^"), ("random", rand, "s"))
    for name, m, marker in named:
        measured, tail = rank_r_error(m, ranks)
        (line,) = ax.plot(ranks, tail, "-", label=name)
        ax.plot(ranks, measured, marker, ms=3.5, color=line.get_color(), alpha=0.7)
    ax.set_xlabel("rank r")
    ax.set_ylabel(r"$\|M - M_r\|_F \,/\, \|M\|_F$")
    ax.set_title(
        "Best rank-r approximation error (128×128)\n"
        r"lines: Eckart–Young $\sqrt{\sum_{i>r}\sigma_i^2}\,/\,\|M\|_F$; dots: measured truncated SVD"
    )
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "lora_rank_error.png", dpi=110)
    plt.close(fig)
    print(f"wrote {args.out / 'lora_spectrum.png'} and {args.out / 'lora_rank_error.png'}")


if __name__ == "__main__":
    main()
