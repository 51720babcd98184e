"""PNG plots of a run directory: losses, learning rate, throughput and evaluation metrics.

Written at the end of every training run and by ``alpro plot RUN [RUN ...]`` (several runs overlay, e.g. an
interrupted-and-resumed run against an uninterrupted one).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from alpro.errors import AlproError
from alpro.train.metrics import read_metrics

GROUPS = {
    "losses.png": ("train/loss", "Training losses"),
    "lr.png": ("train/lr", "Learning rate"),
    "throughput.png": ("throughput/", "Throughput"),
    "eval.png": ("val/", "Evaluation"),
}


def _series(rows, prefix: str) -> dict[str, tuple[list[int], list[float]]]:
    out: dict[str, tuple[list[int], list[float]]] = {}
    for row in rows:
        for k, v in row.items():
            if k.startswith(prefix) and isinstance(v, (int, float)):
                xs, ys = out.setdefault(k, ([], []))
                xs.append(row["step"])
                ys.append(float(v))
    return out


def plot_runs(run_dirs: list[Path], out_dir: Path | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = []
    for rd in run_dirs:
        path = rd / "metrics.jsonl"
        if not path.is_file():
            raise AlproError(f"{rd}: no metrics.jsonl (is this a run directory?)")
        runs.append((rd, read_metrics(path)))
    out_dir = out_dir or (run_dirs[0] / "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for fname, (prefix, title) in GROUPS.items():
        per_run = [(rd, _series(rows, prefix)) for rd, rows in runs]
        keys = sorted({k for _, s in per_run for k in s})
        if not keys:
            continue
        fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
        for ax, key in zip(axes[0], keys):
            for rd, series in per_run:
                if key in series:
                    xs, ys = series[key]
                    ax.plot(xs, ys, marker="o" if len(xs) < 20 else None, ms=3,
                            label=rd.name if len(per_run) > 1 else None)
            ax.set_title(key.split("/", 1)[-1], fontsize=9)
            ax.set_xlabel("step", fontsize=8)
            ax.tick_params(labelsize=7)
            ax.grid(alpha=0.3)
            if len(per_run) > 1:
                ax.legend(fontsize=7)
        fig.suptitle(title, fontsize=10)
        fig.tight_layout()
        fig.savefig(out_dir / fname, dpi=90)
        plt.close(fig)
        written.append(out_dir / fname)
    return written


def plot_run(run_dir: Path) -> list[Path]:
    return plot_runs([run_dir])


@dataclass
class PlotOptions:
    """The options of ``alpro plot`` (parsed by :func:`alpro.config.parse_command`; help from these docstrings)."""

    runs: list[Path]
    """run directories (the first one receives plots/)"""
    out: Path | None = None
    """output directory (default: RUN/plots)"""


def main(argv: list[str] | None = None) -> int:
    from alpro.config import parse_command

    args = parse_command(PlotOptions, argv, prog="alpro plot", description=__doc__.splitlines()[0])
    for path in plot_runs(args.runs, args.out):
        print(path)
    return 0


if __name__ == "__main__":
    from alpro.cli import guarded

    raise SystemExit(guarded("plot", main))
