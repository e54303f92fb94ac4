"""Reports: ``layer_selection.json`` + bar chart, ``conversion.json``, and a FLOP model of selection cost."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING

from sala.utils import fs

if TYPE_CHECKING:  # select.py imports this module to write its report: types only, no import circle
    from sala.convert.select import SelectionResult

logger = logging.getLogger(__name__)

SELECTION_JSON = "layer_selection.json"
SELECTION_PNG = "layer_selection.png"
STUDENTS_FILE = "aligned_students.safetensors"
CONVERSION_JSON = "conversion.json"


def write_json(path: Path, payload: dict) -> Path:
    return fs.write_json(path, payload)  # temporary sibling, then rename (issue 17)


def plot_scores(result: SelectionResult, path: Path) -> Path | None:
    """Bar chart of HALO scores per layer; chosen layers highlighted, forced ones hatched. None without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed: skipping %s (pip install matplotlib)", path)
        return None
    layers = [r.layer for r in result.layers]
    scores = [r.score for r in result.layers]
    colors = ["tab:red" if r.sparse else "tab:blue" for r in result.layers]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.3 * len(layers) + 2), 3.6))
    bars = ax.bar(layers, scores, color=colors)
    for bar, r in zip(bars, result.layers):
        if r.forced:
            bar.set_hatch("//")
    ax.set_xlabel("layer")
    ax.set_ylabel("HALO score (recall drop / general drop)")
    ax.set_title(f"{Path(result.source).name}: softmax layers {result.sparse_layers} (red; hatched = forced)", fontsize=9)
    ax.set_xticks(layers)
    ax.tick_params(axis="x", labelsize=7)
    fig.tight_layout()
    with fs.atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120, format="png")
    plt.close(fig)
    return path


def write_selection_report(result: SelectionResult, out: str | Path, *, save_students: bool = False) -> dict[str, Path]:
    """``layer_selection.json`` (everything in :class:`SelectionResult` but the tensors), the PNG, and optionally
    the aligned students (official tensor names, fp32) for ``sala convert --students``."""
    out = Path(out)
    files = {"json": write_json(out / SELECTION_JSON, result.to_dict())}  # each file: temporary sibling, rename
    png = plot_scores(result, out / SELECTION_PNG)
    if png is not None:
        files["png"] = png
    if save_students:
        if not result.students:
            raise ValueError("the selection result carries no students to save")
        fs.save_safetensors(result.students, out / STUDENTS_FILE, metadata={"format": "pt"})
        files["students"] = out / STUDENTS_FILE
    fs.record_written(out, *files.values())  # sala's own files: a rerun may rewrite them without --force
    logger.info("selection report: %s", ", ".join(str(p) for p in files.values()))
    return files


def read_selection(path: str | Path) -> dict:
    """Load a ``layer_selection.json`` (or the directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / SELECTION_JSON
    return json.loads(p.read_text())


def selection_flops(*, hidden: int, heads: int, kv_heads: int, head_dim: int, layers: int, intermediate: int, vocab: int,
                    train_tokens: int, probe_tokens: int) -> dict:
    """Rough FLOPs of :func:`run_select_layers` (2 x multiply-adds of the linears; attention terms ignored, fine at
    ~512 tokens): the teacher forward on calibration tokens, student forward+backward (3x forward) per layer, and
    the single-swap probes (teacher once, then layers i..L-1 for every i: about L/2 + 1 model forwards)."""
    width = heads * head_dim
    attn = hidden * width * 2 + hidden * kv_heads * head_dim * 2  # q, o + k, v (GQA)
    layer = attn + 3 * hidden * intermediate
    model_fwd = 2 * (layers * layer + hidden * vocab)
    student_fwd = 2 * 5 * hidden * width  # q, k, v (expanded), o, z
    train = train_tokens * (model_fwd + layers * 3 * student_fwd)
    probes = probe_tokens * model_fwd * (1 + layers / 2)
    return {"train_flops": float(train), "probe_flops": float(probes), "total_flops": float(train + probes),
            "per_layer_flops": float(train + probes) / layers}
