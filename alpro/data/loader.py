"""The loader the trainer and evaluators iterate: one shell over a :class:`~alpro.data.protocol.BatchSource`.

The shell owns what every data path shares -- the resume state (header, version and settings checks), which
source each training step draws from, the metrics window and the skip counts, the PEM crop, pinning, and the
device-side finish of batches the workers left unfinished -- so each exists once; the back-ends (plan + PyAV,
plan + DALI, ``pipe:`` streaming, DALI's reader) only turn steps into batches. Build one with
:func:`alpro.data.build_train_loader` / :func:`alpro.data.build_eval_loader`.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from collections.abc import Iterator

import torch

from alpro.data.batch import Batch, pin_batch
from alpro.data.config import DataConfig
from alpro.data.pem import crop_video
from alpro.data.plan import choose_source
from alpro.data.protocol import SETTINGS, STATE_VERSION, BatchSource
from alpro.data.samples import BatchStats
from alpro.data.transforms import finish_batch
from alpro.errors import AlproError

LOG = logging.getLogger("alpro.data")
_DESCRIBED = {"indexed": "an indexed-loader", "stream": "a streaming-loader", "dali_reader": "a DALI-reader"}
_CHANGED = {"indexed": "were the sources changed?", "stream": "were the sources changed?",
            "dali_reader": "was data.dali_reader changed?"}


class MetricsWindow:
    """Counters between two ``metrics()`` calls."""

    def __init__(self):
        self.stats, self.wait, self.t0 = BatchStats(), 0.0, None

    def start_if_idle(self) -> None:
        if self.t0 is None:
            self.t0 = time.perf_counter()

    def add(self, stats: BatchStats, wait: float) -> None:
        self.stats.items += stats.items
        self.stats.decoded_frames += stats.decoded_frames
        self.stats.delivered_frames += stats.delivered_frames
        self.stats.decode_seconds += stats.decode_seconds
        self.wait += wait

    def report(self) -> dict[str, float]:
        now = time.perf_counter()
        elapsed = max(now - (self.t0 or now), 1e-9)
        s = self.stats
        out = {"clips_per_s": s.items / elapsed, "wait_s": self.wait,
               "decoded_per_delivered": s.decoded_frames / max(s.delivered_frames, 1),
               "decode_s_per_clip": s.decode_seconds / max(s.items, 1)}
        self.stats, self.wait, self.t0 = BatchStats(), 0.0, now
        return out


class Loader:
    """Training or evaluation batches of one task on one rank.

    ``len(loader)`` batches per pass; one ``for`` loop is one pass (endless with ``data.resampled``); training
    continues where the previous pass (or the restored state) stopped, evaluation starts over every pass.
    ``state_dict()`` is small and JSON-serialisable; it restores into a loader built with the same settings."""

    def __init__(self, source: BatchSource, cfg: DataConfig, task: str, split: str, rank: int, world_size: int,
                 seed: int):
        self.source, self.cfg, self.task, self.split = source, cfg, task, split
        self.rank, self.world, self.seed = rank, world_size, seed
        self.train = split == "train"
        self.kinds, self.batch_size = list(source.kinds), source.batch_size
        self.step = 0
        self._window = MetricsWindow()
        self._skips: Counter = Counter(source.left_out)  # samples the back-end left out while indexing

    def __len__(self) -> int:
        return len(self.source)

    # -- state

    def state_dict(self) -> dict:
        """Position of the next batch: the header (version, back-end, the settings it must be restored with),
        the step, and the back-end's position (a few integers for the indexed paths); valid for any worker count
        on the indexed paths."""
        return {"version": STATE_VERSION, "mode": self.source.mode, "task": self.task, "seed": self.seed,
                "rank": self.rank, "world_size": self.world, "batch_size": self.batch_size, "kinds": list(self.kinds),
                "step": self.step, **self.source.position()}

    def load_state_dict(self, state: dict) -> None:
        mode = self.source.mode
        if state.get("version") != STATE_VERSION or state.get("mode") != mode:
            raise AlproError(f"loader state (version {state.get('version')}, mode {state.get('mode')}) is not "
                             f"{_DESCRIBED.get(mode, mode)} state of version {STATE_VERSION}: "
                             f"{_CHANGED.get(mode, 'were the sources changed?')}")
        mine = {"task": self.task, "seed": self.seed, "world_size": self.world, "batch_size": self.batch_size,
                "kinds": list(self.kinds)}
        elastic = ("world_size",) if getattr(self.source, "elastic", False) else ()
        mismatched = [k for k in SETTINGS if state.get(k) != mine[k] and k not in elastic]
        if mismatched:
            hints = [self.source.resume_hints[k] for k in mismatched if k in self.source.resume_hints]
            raise AlproError(f"loader state was saved with different {', '.join(mismatched)}: "
                             f"{ {k: state.get(k) for k in mismatched} }, now { {k: mine[k] for k in mismatched} }; "
                             + ("; ".join(hints) or "resume with the same data settings"))
        self.source.restore(state)
        self.step = int(state["step"])

    # -- iteration

    def _mix(self, step: int) -> int:
        return choose_source(self.seed, step, self.source.weights) if self.train else 0

    def _pass_end(self) -> int | None:
        if not self.train:
            return len(self)
        if self.cfg.resampled:
            return None
        return (self.step // len(self) + 1) * len(self)

    def __iter__(self) -> Iterator[Batch]:
        if not self.train:
            self.step = 0
        batches = self.source.batches(self.step, self._pass_end(), self._mix)
        self._window.start_if_idle()
        while True:
            t0 = time.perf_counter()
            try:
                batch, stats = next(batches)
            except StopIteration:
                return
            if batch.video_ops is not None:
                batch = self._finish(batch)
            elif batch.pem_box is not None and batch.crop_video is None:
                batch.crop_video = crop_video(batch.video, batch.pem_box)
            if self.cfg.pin_memory and torch.cuda.is_available() and batch.video.device.type == "cpu":
                batch = pin_batch(batch)
            self._window.add(stats, time.perf_counter() - t0)
            self._skips.update(stats.skips)
            self.step += 1
            yield batch

    def _finish(self, batch: Batch) -> Batch:
        """A batch the workers left unfinished (``data.augment_on: device``): its uint8 clips go to the training
        device (the current CUDA device, else the CPU), where their RandAugment ops, normalisation and PEM crop
        input are made."""
        video = batch.video
        if torch.cuda.is_available():
            if self.cfg.pin_memory:
                video = video.pin_memory()
            video = video.to(torch.device("cuda", torch.cuda.current_device()), non_blocking=True)
        batch.video = finish_batch(video, batch.video_ops, self.cfg.randaugment.magnitude, self.cfg.frame_size)
        batch.video_ops = None
        if batch.pem_box is not None:
            batch.crop_video = crop_video(batch.video, batch.pem_box)
        return batch

    def plan(self, steps: int | None = None) -> Iterator[dict]:
        """The remaining sequence of the current pass without decoding pixels: per step, the source, epoch,
        batch and for every item its key, frame indices, augmentation parameters, PEM box and text. Items
        that fail before decoding are replaced exactly as in training; decode failures cannot be foreseen."""
        stop = self._pass_end()
        if steps is not None:
            stop = self.step + steps if stop is None else min(stop, self.step + steps)
        return self.source.plan(self.step, stop, self._mix)

    # -- reporting

    def metrics(self) -> dict[str, float]:
        """Throughput since the previous call and totals: clips/s, frames decoded per frame delivered, seconds
        the consumer waited for data, decode seconds per clip, skipped samples by reason (cumulative)."""
        out = self._window.report()
        out["skipped"] = float(sum(self._skips.values()))
        out.update({f"skipped/{reason}": float(n) for reason, n in sorted(self._skips.items())})
        return out

    def close(self) -> None:
        """Stop workers and pipelines now (they also stop when the loader is garbage collected)."""
        self.source.close()
