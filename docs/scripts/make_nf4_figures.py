"""Figures for docs/nf4.md, drawn with lora_core.quant.nf4 itself.

Run: ``python docs/scripts/make_nf4_figures.py [--out DIR]`` (default ``docs/figures``). CPU, a few s.

- ``nf4_codes.png``: left, the 16 NF4 codes (``lora_core.quant.nf4_codes.NF4_CODE``) sitting on the
  normalised quantile function of N(0, 1) at the probabilities QLoRA builds them from
  (``nf4_code_table_from_quantiles``); right, where block-normalised Gaussian weights ``w / absmax``
  actually fall, with the NF4 codes and the 15 levels of symmetric int4 drawn over them.
- ``nf4_error_hist.png``: histogram of the round-trip error ``dequantize(quantize(w)) − w`` for 1M
  Gaussian weights (σ = 0.02), NF4 (``quantize_nf4``/``dequantize_nf4``, block 64) against uniform absmax
  int4 with the same blocks, with each one's RMS error in the legend.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch

from lora_core.quant.nf4 import dequantize_nf4, quantize_nf4
from lora_core.quant.nf4_codes import NF4_CODE, nf4_code_table_from_quantiles

OFFSET = 0.9677083  # outermost probability: mean of 1 − 1/(2·15) and 1 − 1/(2·16), see docs/nf4.md
BLOCK = 64


def int4_absmax_roundtrip(w: torch.Tensor, block_size: int = BLOCK) -> torch.Tensor:
    """Uniform symmetric int4 with a float32 absmax per block: q = round(7·w/absmax) ∈ [-7, 7]."""
    blocks = w.reshape(-1, block_size).float()  # (nb, bs)
    absmax = blocks.abs().amax(dim=-1, keepdim=True)  # (nb, 1)
    q = torch.round(blocks / absmax * 7).clamp(-7, 7)
    return (q * absmax / 7).reshape(w.shape)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "figures")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    # Tiny matrices gain nothing from threads, and on a shared CPU extra threads only contend (10× slower
    # measured here); one thread also makes the figures reproducible across machines with different cores.
    torch.set_num_threads(1)

    code = torch.tensor(NF4_CODE)
    assert torch.allclose(nf4_code_table_from_quantiles(), code)  # the table is the quantile construction

    # ---- Figure 1: codes against normal quantiles, and against the weights they must represent ----
    fig, (ax_q, ax_w) = plt.subplots(1, 2, figsize=(11, 4.2))
    p = torch.linspace(1 - OFFSET, OFFSET, 400, dtype=torch.float64)
    scale = torch.special.ndtri(torch.tensor(OFFSET, dtype=torch.float64))  # Φ⁻¹(offset) ↦ 1
    ax_q.plot(p, torch.special.ndtri(p) / scale, color="0.6", label=r"$\Phi^{-1}(p)\,/\,\Phi^{-1}(0.9677)$")
    p_pos = torch.linspace(OFFSET, 0.5, 9)[:-1]  # 8 positive codes
    p_neg = 1 - torch.linspace(OFFSET, 0.5, 8)[:-1]  # 7 negative codes
    p_codes = torch.cat([p_neg.sort().values, torch.tensor([0.5]), p_pos.sort().values])  # (16,) sorted
    ax_q.plot(p_codes, code, "o", color="C0", label="NF4 codes (7 negative, 0, 8 positive)")
    for pc, c in zip(p_codes.tolist(), code.tolist()):
        ax_q.plot([pc, pc], [-1.05, c], color="C0", lw=0.5, alpha=0.4)
    ax_q.set_xlabel("probability $p$")
    ax_q.set_ylabel("code value")
    ax_q.set_title("NF4 codes are normalised quantiles of N(0, 1)")
    ax_q.set_ylim(-1.05, 1.05)
    ax_q.grid(True, alpha=0.3)
    ax_q.legend(loc="upper left", fontsize=9)

    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4096, BLOCK, generator=gen)  # 4096 blocks of 64 Gaussian weights
    normalised = (w / w.abs().amax(dim=-1, keepdim=True)).reshape(-1)
    ax_w.hist(normalised, bins=200, density=True, color="0.75", label="$w / \\mathrm{absmax}$ (blocks of 64)")
    for i, c in enumerate(code.tolist()):
        ax_w.axvline(c, color="C0", lw=1.2, label="NF4 codes" if i == 0 else None)
    for i, level in enumerate((torch.arange(-7, 8) / 7).tolist()):
        ax_w.axvline(level, color="C3", lw=1, ls=":", label="int4 levels k/7" if i == 0 else None)
    ax_w.set_xlabel("normalised weight")
    ax_w.set_ylabel("density")
    ax_w.set_title("Codes vs where block-normalised weights fall")
    ax_w.legend(loc="upper left", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out / "nf4_codes.png", dpi=110)
    plt.close(fig)

    # ---- Figure 2: round-trip error, NF4 vs int4, same block size and scale storage ----
    w = torch.randn(1024, 1024, generator=gen) * 0.02  # (1024, 1024), a typical init scale
    err_nf4 = dequantize_nf4(quantize_nf4(w, block_size=BLOCK, double_quant=False), torch.float32) - w
    err_int4 = int4_absmax_roundtrip(w) - w
    rms = {name: float(e.square().mean().sqrt()) for name, e in (("nf4", err_nf4), ("int4", err_int4))}
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    bins = torch.linspace(-0.012, 0.012, 161)
    ax.hist(err_int4.reshape(-1), bins=bins, histtype="stepfilled", alpha=0.45, color="C3",
            label=f"int4 absmax, RMS {rms['int4']:.2e}")  # fmt: skip
    ax.hist(err_nf4.reshape(-1), bins=bins, histtype="stepfilled", alpha=0.55, color="C0",
            label=f"NF4, RMS {rms['nf4']:.2e}")  # fmt: skip
    ax.set_yscale("log")
    ax.set_xlabel(r"round-trip error $\hat w - w$")
    ax.set_ylabel("count (log)")
    ax.set_title("Quantization error on N(0, 0.02²) weights\n(1M weights, blocks of 64, float32 absmax)")
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.out / "nf4_error_hist.png", dpi=110)
    plt.close(fig)
    print(f"RMS error: NF4 {rms['nf4']:.3e}, int4 {rms['int4']:.3e}")
    print(f"wrote {args.out / 'nf4_codes.png'} and {args.out / 'nf4_error_hist.png'}")


if __name__ == "__main__":
    main()
