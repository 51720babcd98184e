"""Draw docs/architecture.png: the layers of the project and the path of one frame through them.

Run from the repository root: ``.venv/bin/python docs/architecture.py``. Needs only matplotlib (no new
dependency); the picture is described in docs/architecture.md.
"""

from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

OUT = Path(__file__).with_name("architecture.png")

# Layer colours: offline sharding, data, model, kernels, training, foundation.
C = {
    "input": "#eeeeee", "shard": "#fde2c8", "data": "#d6e9f8", "model": "#dcefd5",
    "kernel": "#f6d5e5", "train": "#e6dcf3", "out": "#f4f0c8", "base": "#f2f2f2",
}


def box(ax, x, y, w, h, title, sub="", color="#ffffff", size=10):
    """A rounded box with a bold title and an optional small second line; (x, y) is the lower-left corner."""
    ax.add_patch(FancyBboxPatch((x, y), w, h, boxstyle="round,pad=0.3,rounding_size=0.8",
                                fc=color, ec="#444444", lw=1.0))
    if sub:
        ax.text(x + w / 2, y + h * 0.66, title, ha="center", va="center", fontsize=size, weight="bold")
        ax.text(x + w / 2, y + h * 0.28, sub, ha="center", va="center", fontsize=size - 2.5, color="#333333",
                family="monospace")
    else:
        ax.text(x + w / 2, y + h / 2, title, ha="center", va="center", fontsize=size, weight="bold")


def arrow(ax, x0, y0, x1, y1, label="", style="-|>", color="#222222", ls="-"):
    ax.add_patch(FancyArrowPatch((x0, y0), (x1, y1), arrowstyle=style, mutation_scale=14, lw=1.3,
                                 color=color, linestyle=ls, shrinkA=2, shrinkB=2))
    if label:
        ax.text((x0 + x1) / 2 + 1.0, (y0 + y1) / 2, label, ha="left", va="center", fontsize=7.5,
                style="italic", color="#333333")


def band(ax, y0, y1, label, color):
    """A layer band behind the main column, labelled on the left."""
    ax.add_patch(FancyBboxPatch((1, y0), 76, y1 - y0, boxstyle="round,pad=0.2,rounding_size=1.2",
                                fc=color, ec="none", alpha=0.35, zorder=0))
    ax.text(2.5, (y0 + y1) / 2, label, ha="left", va="center", fontsize=9, weight="bold", color="#333333",
            rotation=90)


def main() -> None:
    fig, ax = plt.subplots(figsize=(11, 14))
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 140)
    ax.axis("off")
    ax.text(50, 138, "ALPRO-at-scale: layers and the path of a frame", ha="center", va="center",
            fontsize=15, weight="bold")

    # ---- layer bands (left labels) ----
    band(ax, 105, 135, "offline: alpro.sharding", C["shard"])
    band(ax, 63, 104, "alpro.data", C["data"])
    band(ax, 36, 62, "alpro.models", C["model"])
    band(ax, 2, 35, "alpro.train", C["train"])

    cx, w = 10, 64  # main column: x from 10 to 74
    # ---- offline sharding ----
    box(ax, cx + 12, 128, 40, 5.5, "mp4 / jpg + manifest", "raw videos, or alpro synth (alpro.corpus)", C["input"])
    box(ax, cx, 117, w, 7, "alpro shard   (sharding/ = alpro.sharding)",
        "manifest.py -> media.py (transcode) -> writer.py -> index.py", C["shard"])
    box(ax, cx, 106.5, w, 7, "tar shards + index.json.zst",
        "KEY.mp4 .json .txt .vinfo | _stats.json, .idx  (names: alpro/shard_format.py)", C["shard"])
    arrow(ax, 42, 127.7, 42, 124.3)
    arrow(ax, 42, 116.7, 42, 113.8)

    # ---- data ----
    box(ax, cx, 96, w, 6.5, "plan   (alpro/data/plan.py)",
        "ItemTable, TrainPlan / EvalPlan: seeded order, frames, augment, MLM", C["data"])
    arrow(ax, 42, 106.2, 42, 102.8, "shards.py reads index + tars")
    bw, gap = 14.5, 2.0
    names = [("indexed PyAV", "indexed.py"), ("indexed DALI", "dali.py"),
             ("streamed pipe:", "stream.py"), ("DALI reader", "dali_reader.py")]
    for i, (t, s) in enumerate(names):
        bx = cx + i * (bw + gap)
        box(ax, bx, 83, bw, 6.5, t, s, "#c2ddf3", size=9)
        arrow(ax, 42, 95.7, bx + bw / 2, 89.8)
    ax.text(76, 94.2, "BatchSource back-ends (protocol.py)", fontsize=7.5, ha="right", va="center", style="italic")
    box(ax, cx, 72.5, w, 6.5, "Loader shell   (alpro/data/loader.py; factory.py builds it)",
        "state, metrics, skips, task mixing, pinning", C["data"])
    for i in range(4):
        bx = cx + i * (bw + gap)
        arrow(ax, bx + bw / 2, 82.7, 42, 79.3)
    box(ax, cx + 17, 64.5, 30, 5, "Batch", "alpro/data/batch.py", C["data"], size=10)
    arrow(ax, 42, 72.2, 42, 69.8)

    # ---- model ----
    mw = 20.0
    encs = [("BERT text", "text_encoder.py"), ("prompter", "prompter.py"), ("TimeSformer", "video_encoder.py")]
    for i, (t, s) in enumerate(encs):
        bx = cx + i * (mw + 2.0)
        box(ax, bx, 54.5, mw, 5.5, t, s, "#c9e6bf", size=9)
        arrow(ax, 42, 64.2, bx + mw / 2, 60.3)
    box(ax, cx, 45.5, w, 5.5, "ALPRO heads   (alpro/models/alpro.py)",
        "VTC / VTM / MLM / PEM heads, hard negatives", C["model"])
    for i in range(3):
        arrow(ax, cx + i * (mw + 2.0) + mw / 2, 54.2, cx + i * (mw + 2.0) + mw / 2, 51.3)
    box(ax, cx + 6, 37.5, w - 12, 5, "losses: VTC  VTM  MLM  PEM", "", "#c9e6bf", size=10)
    arrow(ax, 42, 45.2, 42, 42.8)

    # ---- kernels (side) ----
    box(ax, 80, 42, 19, 12, "alpro.kernels", "dispatch per op\nTriton on CUDA\nPyTorch on CPU", C["kernel"],
        size=10)
    arrow(ax, 74.3, 57, 80, 52, color="#8a2c5c", ls="--")
    ax.text(77.5, 57.5, "attention", fontsize=7.5, style="italic", color="#8a2c5c")
    arrow(ax, 68.3, 40, 80, 44, color="#8a2c5c", ls="--")
    ax.text(80, 39.5, "contrastive loss", fontsize=7.5, style="italic", color="#8a2c5c")

    # ---- training ----
    box(ax, cx, 24, w, 7, "DeepSpeed engine   (alpro/train/runtime.py, trainer.py)",
        "ZeRO, generated DeepSpeed JSON, step loop, resume", C["train"])
    arrow(ax, 42, 37.2, 42, 31.3, "loss.backward / engine.step")
    ow = 14.5
    outs = [("checkpoints", "checkpoint.py"), ("export", "export.py"), ("eval", "evaluate.py"),
            ("alpro.apps", "demo, search")]
    for i, (t, s) in enumerate(outs):
        bx = cx + i * (ow + 2.0)
        box(ax, bx, 6, ow, 6.5, t, s, C["out"], size=9)
        arrow(ax, 42, 23.7, bx + ow / 2, 12.8)

    # ---- foundation (right column) ----
    ax.add_patch(FancyBboxPatch((79, 60), 20, 66, boxstyle="round,pad=0.3,rounding_size=1.0",
                                fc=C["base"], ec="#777777", lw=1.0, ls="--"))
    ax.text(89, 123, "foundation\n(shared leaves)", ha="center", va="center", fontsize=10, weight="bold")
    base = [("errors.py", "AlproError"), ("config.py", "typed YAML configs"), ("fileio.py", "atomic writes"),
            ("tasks.py", "tasks, PEM prompts"), ("shard_format.py", "the shard contract"),
            ("dist.py", "every collective"), ("cli.py", "one `alpro` command")]
    for i, (t, s) in enumerate(base):
        y = 112 - i * 7.3
        box(ax, 80.3, y, 17.4, 5.5, t, s, "#ffffff", size=8.5)

    ax.text(50, 0.8, "solid: data flow of one frame    dashed: calls into alpro.kernels    "
            "rules each layer keeps: docs/architecture.md (checked by tests/test_architecture.py)",
            ha="center", va="bottom", fontsize=7.5, color="#444444")
    fig.savefig(OUT, dpi=72, bbox_inches="tight")
    print(f"wrote {OUT} ({OUT.stat().st_size // 1024} KiB)")


if __name__ == "__main__":
    main()
