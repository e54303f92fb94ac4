"""Training metrics as JSON lines, and the loss curves of every stage as one PNG."""

from __future__ import annotations

import json
from pathlib import Path


class MetricsLog:
    """Appends one JSON object per line (rank 0 only); a resumed run appends to the same file."""

    def __init__(self, path: Path, enabled: bool = True) -> None:
        self.path, self.enabled = path, enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def plot_losses(metrics: Path, png: Path) -> Path | None:
    """One panel per stage: loss against tokens (the last record wins for a step logged twice by a resume)."""
    if not Path(metrics).exists():
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_stage: dict[str, dict[int, dict]] = {}
    for rec in read_metrics(metrics):
        by_stage.setdefault(rec["stage"], {})[rec["step"]] = rec
    if not by_stage:
        return None
    fig, axes = plt.subplots(1, len(by_stage), figsize=(4.5 * len(by_stage), 3.4), squeeze=False)
    for ax, (stage, recs) in zip(axes[0], by_stage.items()):
        steps = sorted(recs)
        ax.plot([recs[s]["tokens"] / 1e6 for s in steps], [recs[s]["loss"] for s in steps], lw=1.2)
        ax.set_title(stage)
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = png.with_name(png.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(png)
    return png
