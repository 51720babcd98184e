"""The contract between the :class:`~alpro.data.loader.Loader` shell and its back-ends.

The shell owns everything the four data paths have in common: the resume state's header (version, mode and
the settings a state must match), which source each step draws from, the metrics window and the skip counts,
the PEM crop and pinning. A back-end (:class:`BatchSource`) only turns steps into batches and keeps its own
position. One back-end per way of reading:

- :class:`alpro.data.indexed.IndexedSource` (state mode ``indexed``): seekable shards in the global plan,
  PyAV decoding in DataLoader workers;
- :class:`alpro.data.dali.DaliIndexedSource` (``indexed``): the same plan, video decoded by DALI;
- :class:`alpro.data.stream.StreamSource` (``stream``): ``pipe:`` commands, front to back;
- :class:`alpro.data.dali_reader.DaliReaderSource` (``dali_reader``): DALI's own webdataset reader.

This module imports nothing heavy, so the back-ends and the shell can both depend on it without a cycle.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from alpro.data.batch import Batch
    from alpro.data.samples import BatchStats

STATE_VERSION = 1
"""Version of the loader state (``Loader.state_dict``); the layout is flat: the shell's header and the
back-end's :meth:`BatchSource.position` side by side, as every path wrote it before the shell existed."""

SETTINGS = ("task", "seed", "world_size", "batch_size", "kinds")
"""What a saved state must agree on with the loader that restores it."""

Mix = Callable[[int], int]
"""Step -> index of the source (in ``kinds``) that step draws from."""


@runtime_checkable
class BatchSource(Protocol):
    """One back-end of the loader: batches for a sequence of steps, and the position to resume from.

    The shell calls :meth:`batches` once per pass; the back-end may prefetch, but :meth:`position` must
    describe exactly the batches it has *yielded* (so prefetched batches never leak into a checkpoint)."""

    mode: str
    """The state's ``mode``: a state restores only into a back-end of the same mode."""
    kinds: list[str]
    """The sources it reads, in mixing order (``video``, ``image``)."""
    weights: list[float]
    """Probability of each source per training step (:func:`alpro.data.plan.choose_source`)."""
    batch_size: int
    left_out: Counter
    """Samples left out while building the source, by reason (counted in ``skipped/<reason>`` from the start)."""
    resume_hints: dict[str, str]
    """Extra advice by setting name, for a state saved with a different value of that setting."""

    def __len__(self) -> int:
        """Batches per pass (training: one epoch of every source; evaluation: this rank's batches)."""
        ...

    def batches(self, step: int, stop: int | None, mix: Mix) -> Iterator[tuple[Batch, BatchStats]]:
        """The batches of steps ``step``, ``step + 1``, ... up to ``stop`` (None: endless), each with its counters.
        ``mix(s)`` is the source of step ``s``. Evaluation passes always start at step 0."""
        ...

    def position(self) -> dict:
        """The back-end's part of the resume state (JSON-serialisable), after the batches yielded so far."""
        ...

    def restore(self, position: dict) -> None:
        """Continue from a :meth:`position` (the shell has checked the header and the settings)."""
        ...

    def plan(self, step: int, stop: int | None, mix: Mix) -> Iterator[dict]:
        """What :meth:`batches` would deliver, without decoding pixels; AlproError where the order is not known
        in advance."""
        ...

    def close(self) -> None:
        """Release workers and pipelines now."""
        ...
