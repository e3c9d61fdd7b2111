"""Small per-cell figures logged with each MLflow run."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def learning_curve(history: list[dict[str, float]], title: str, path: Path) -> Path:
    """Train and validation loss and accuracy per epoch, best validation epoch marked."""
    epochs = range(1, len(history) + 1)
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(9, 3.5))
    for key, style in (("train", "--"), ("val", "-")):
        loss_ax.plot(epochs, [h[f"{key}_loss"] for h in history], style, label=key)
        acc_ax.plot(epochs, [h[f"{key}_acc"] for h in history], style, label=key)
    best = min(epochs, key=lambda e: history[e - 1]["val_loss"])
    loss_ax.axvline(best, color="grey", lw=0.8, ls=":", label=f"best val (epoch {best})")
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title=f"{title}: loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy", title=f"{title}: accuracy")
    for ax in (loss_ax, acc_ax):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
