"""The main job end to end on the embedded corpus: what ``make demo`` runs.

    alpro demo --out demo_out            # 10-13 minutes on 2 CPU cores after installation

1. ``alpro synth``: the shapes-world corpus (H.264 clips, JPEG images, captions, QA, splits);
2. ``alpro shard``: train videos, train images and test videos into three shard sets;
3. ``alpro entities``: the PEM entity list from the training captions;
4. the prompter (VTC only), 5. ALPRO pre-training with VTC + VTM + MLM + PEM under DeepSpeed ZeRO-2 on
   2 processes (torchrun), 6. zero-shot text->video retrieval on the held-out test clips,
7. QA fine-tuning and 8. QA evaluation on the test clips;
9. what was learned (:mod:`alpro.apps.demo_report`): QA accuracy per question type and zero-shot retrieval's
   top-1 agreement per caption attribute, against chance, in ``OUT/report.json`` and ``OUT/learned.png``;
10. a results table against chance / the majority answer (overall and per question type), written to
   ``OUT/results.md`` and ``results.json``, next to every run's plots (``OUT/runs/*/plots/*.png``).

Every step is skipped when its output is already complete, so an interrupted demo continues where it stopped.
Each step is the real CLI (a subprocess), exactly as a user would type it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from alpro.config import parse_command
from alpro.errors import AlproError
from alpro.recipes import recipe_dir
from alpro.shard_format import INDEX_NAME

CONFIGS = recipe_dir("demo")  # package data, copies of launch/configs/demo (alpro/recipes/__init__.py)


def _run(cmd: list[str], log: Path, env: dict[str, str] | None = None) -> None:
    """Run one step, streaming its output to the console and to OUT/logs/<step>.log."""
    print("$ " + " ".join(cmd), flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, **(env or {})})
        for line in proc.stdout:
            f.write(line)
            if _interesting(line):
                print("  " + line.rstrip(), flush=True)
        code = proc.wait()
    if code != 0:
        raise AlproError(f"step failed (exit {code}): {' '.join(cmd)} -- see {log}")


def _interesting(line: str) -> bool:
    """Keep the console readable: progress lines, summaries and errors, not library chatter."""
    noisy = ("[WARNING]", "[INFO]", "FutureWarning", "return func(", "****", "Setting OMP_NUM_THREADS",
             "Processing zero checkpoint", "Parsing checkpoint", "Loading checkpoint", "Detected checkpoint",
             "Reconstructed", "warnings.warn")
    return bool(line.strip()) and not any(n in line for n in noisy)


def _alpro(*args: str) -> list[str]:
    return [sys.executable, "-m", "alpro", *args]


def _torchrun(nproc: int, *args: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc),
            "-m", "alpro.train", *args]


def run_demo(out: Path, num_clips: int, nproc: int, scale: float) -> dict:
    t_start = time.perf_counter()
    corpus, shards, runs, logs = out / "corpus", out / "shards", out / "runs", out / "logs"
    timings: dict[str, float] = {}

    def step(name: str, done: bool, cmd: list[str], env: dict[str, str] | None = None) -> None:
        if done:
            print(f"[{name}] already done, skipped", flush=True)
            return
        t0 = time.perf_counter()
        print(f"\n[{name}]", flush=True)
        _run(cmd, logs / f"{name}.log", env)
        timings[name] = time.perf_counter() - t0

    step("synth", (corpus / "manifest.jsonl").is_file(),
         _alpro("synth", str(corpus), "--num-clips", str(num_clips), "--quiet", "--overwrite"))
    # Shards stored at 8 fps and short side 72: the demo model sees 4 frames of 64x64.
    shard_opts = ["--fps", "8", "--short-side", "72", "--workers", "2", "--no-progress"]
    for name, split, media in (("train_video", "train", "video"), ("train_image", "train", "image"),
                               ("test_video", "test", "video")):
        step(f"shard-{name}", (shards / name / INDEX_NAME).is_file(),
             _alpro("shard", str(corpus / "manifest.jsonl"), str(shards / name), "--split", split,
                    "--media", media, *shard_opts))
    # PEM entities: the corpus's own noun list, checked by `alpro entities`. The model-free tagger on the captions
    # counts "square" (an adjective in its list) as an adjective and picks verbs ("moves", "stays") and directions
    # as nouns instead: 52 entries of which 20 are nouns (docs/corpus.md, "What the demo learns").
    step("entities", (out / "entities.txt").is_file(),
         _alpro("entities", "--entities", str(corpus / "entities.txt"), "--out", str(out / "entities.txt")))

    data = ["--data.train.video", str(shards / "train_video"), "--data.train.image", str(shards / "train_image"),
            "--data.test.video", str(shards / "test_video")]
    # Pre-training and QA runs skip their end-of-run evaluation (the same test split that the eval steps below
    # score and save, about 35 s on 2 cores); the eval and report steps name the test shards instead.
    no_eval, test = ["--data.test.video", "null"], ["--data.test.video", str(shards / "test_video")]
    # Contrastive stages at 16 clips a rank (common.yaml): ~0.24 s a prompter step on two cores, so the prompter,
    # which teaches VTC the objects, gets most of the time; pre-training added nothing to retrieval (docs/corpus.md).
    steps = {name: max(1, round(n * scale)) for name, n in (("prompter", 800), ("pretrain", 120), ("qa", 600))}
    step("prompter", (runs / "prompter" / "final" / "model.safetensors").is_file(),
         _torchrun(nproc, "--config", str(CONFIGS / "prompter.yaml"), "--train.run_dir", str(runs / "prompter"),
                   "--train.steps", str(steps["prompter"]), "--train.resume", "auto", *data))
    step("pretrain", (runs / "pretrain" / "final" / "model.safetensors").is_file(),
         _torchrun(nproc, "--config", str(CONFIGS / "pretrain.yaml"), "--train.run_dir", str(runs / "pretrain"),
                   "--train.steps", str(steps["pretrain"]), "--train.resume", "auto",
                   "--init.weights", str(runs / "prompter" / "final" / "model.safetensors"),
                   "--init.prompter", str(runs / "prompter" / "final" / "model.safetensors"),
                   "--init.entities", str(out / "entities.txt"), *data, *no_eval))
    results_dir = out / "results"
    step("zero-shot-retrieval", (results_dir / "zeroshot_retrieval.json").is_file(),
         _alpro("eval", str(runs / "pretrain"), "--task", "retrieval", "--split", "test", "--protocol", "lavis",
                "--k-test", "16", "--no-progress", "--out", str(results_dir / "zeroshot_retrieval.json"), *test))
    step("qa-finetune", (runs / "qa" / "final" / "model.safetensors").is_file(),
         _torchrun(nproc, "--config", str(CONFIGS / "qa.yaml"), "--train.run_dir", str(runs / "qa"),
                   "--train.steps", str(steps["qa"]), "--train.resume", "auto",
                   "--init.weights", str(runs / "pretrain" / "final" / "model.safetensors"), *data,
                   "--data.train.image", "null", *no_eval))
    step("qa-eval", (results_dir / "qa.json").is_file(),
         _alpro("eval", str(runs / "qa"), "--split", "test", "--no-progress", "--out", str(results_dir / "qa.json"),
                *test))
    step("report", (out / "report.json").is_file() and (out / "learned.png").is_file(),
         [sys.executable, "-m", "alpro.apps.demo_report", str(runs / "pretrain"), "--corpus", str(corpus),
          "--qa", str(results_dir / "qa.json"), "--k-test", "16", "--out", str(out), *test])

    retrieval = json.loads((results_dir / "zeroshot_retrieval.json").read_text())
    qa = json.loads((results_dir / "qa.json").read_text())
    report = json.loads((out / "report.json").read_text())
    summary = {"retrieval": retrieval, "qa": qa, "report": report,
               "minutes": (time.perf_counter() - t_start) / 60, "step_seconds": timings}
    (out / "results.json").write_text(json.dumps(summary, indent=1))
    table = results_table(retrieval, qa, report)
    (out / "results.md").write_text(table + "\n")
    print("\n" + table)
    print(f"\nwhat was learned, per question type and caption attribute: {out / 'learned.png'}")
    print(f"plots: {', '.join(str(p) for p in sorted(runs.glob('*/plots/losses.png')))}")
    print(f"demo finished in {summary['minutes']:.1f} min (this invocation); outputs under {out}/")
    return summary


def results_table(retrieval: dict, qa: dict, report: dict | None = None) -> str:
    """Markdown table: zero-shot text->video retrieval against chance, QA accuracy against the majority answer
    (overall, and per question type beside its uniform chance and its majority answer when ``report`` has them)."""
    n = int(retrieval["n_videos"])
    best = "lavis" if "lavis_t2v_r1" in retrieval else "vtc"
    rows = [
        "| task (test split) | metric | ALPRO (demo) | baseline | ratio |",
        "|---|---|---|---|---|",
    ]
    for k in (1, 5, 10):
        got, chance = retrieval[f"{best}_t2v_r{k}"], retrieval[f"chance_r{k}"]
        rows.append(f"| zero-shot text->video retrieval, {n} clips ({best} protocol) | R@{k} | {got:.1f} | "
                    f"{chance:.1f} (chance) | {got / chance:.1f}x |")
    if best == "lavis" and "vtc_t2v_r1" in retrieval:
        got = retrieval["vtc_t2v_r1"]
        rows.append(f"| zero-shot text->video retrieval ({n} clips, VTC alone, before re-ranking) | R@1 | {got:.1f} | "
                    f"{retrieval['chance_r1']:.1f} (chance) | {got / retrieval['chance_r1']:.1f}x |")
    if "original_t2v_r1" in retrieval:
        got = retrieval["original_t2v_r1"]
        rows.append(f"| zero-shot text->video retrieval ({n} clips, original protocol) | R@1 | {got:.1f} | "
                    f"{retrieval['chance_r1']:.1f} (chance) | {got / retrieval['chance_r1']:.1f}x |")
    majority = max(qa["majority_acc"], 1e-9)
    rows.append(f"| video QA, {int(qa['n'])} questions | accuracy | {qa['acc']:.1f} | {qa['majority_acc']:.1f} "
                f"(majority answer) | {qa['acc'] / majority:.1f}x |")
    per_type = (report or {}).get("qa") or {}
    for key in sorted(k for k in qa if k.startswith("acc_")):
        base = per_type.get(key[4:])
        if base is None:
            rows.append(f"| video QA | {key[4:]} accuracy | {qa[key]:.1f} | | |")
            continue
        ratio = qa[key] / max(base["chance"], 1e-9)
        rows.append(f"| video QA, {int(base['n'])} {key[4:]} questions | accuracy | {qa[key]:.1f} | "
                    f"{base['chance']:.1f} (chance), {base['majority']:.1f} (majority) | {ratio:.1f}x chance |")
    return "\n".join(rows)


@dataclass
class DemoOptions:
    """The options of ``alpro demo`` (parsed by :func:`alpro.config.parse_command`; help from these docstrings)."""

    out: Path = Path("demo_out")
    """output directory"""
    num_clips: int = 1200
    """clips in the synthetic corpus"""
    nproc: int = 2
    """training processes (torchrun)"""
    scale: float = 1.0
    """multiply every stage's step count"""
    fresh: bool = False
    """delete OUT first instead of continuing a previous demo"""


def main(argv: list[str] | None = None) -> int:
    args = parse_command(DemoOptions, argv, prog="alpro demo", description=__doc__.splitlines()[0])
    if args.num_clips < 50:
        raise AlproError("--num-clips must be >= 50 (the test split needs enough clips for retrieval)")
    if args.fresh and args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True, exist_ok=True)
    run_demo(args.out, args.num_clips, args.nproc, args.scale)
    return 0


if __name__ == "__main__":
    from alpro.cli import guarded

    raise SystemExit(guarded("demo", main))
