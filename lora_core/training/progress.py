"""What a training run shows while and after it runs: the one-line progress bar on stderr and the loss
curve PNG (``lc.train`` and ``lora-core finetune`` draw both)."""

from __future__ import annotations

import sys
from pathlib import Path

from lora_core.atomic import atomic_write


class ProgressBar:
    """A one-line progress bar on stderr (redrawn on a terminal, a line every ~5% otherwise)."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total, self.enabled, self.tty = total, enabled, sys.stderr.isatty()
        self.every = 1 if self.tty else max(1, total // 20)

    def update(self, step: int, loss: float, lr: float, tok_s: float) -> None:
        if not self.enabled or (step % self.every and step != self.total):
            return
        width = 24
        bar = "#" * (width * step // self.total)
        line = f"[{bar:<{width}}] {step}/{self.total} loss {loss:.4f} lr {lr:.2e} {tok_s:,.0f} tok/s"
        sys.stderr.write(("\r" + line) if self.tty else (line + "\n"))
        if self.tty and step == self.total:
            sys.stderr.write("\n")
        sys.stderr.flush()


def plot_loss_curve(history: list[dict[str, float]], path: str | Path) -> bool:
    """Draw train (and eval) loss against step into a PNG; False when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 4))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return True


__all__ = ["ProgressBar", "plot_loss_curve"]
