"""Frame samplers: exact indices for the deterministic ones, invariants for the random ones."""

from __future__ import annotations

import numpy as np
import pytest

from alpro.data.sampling import sample_frames


def test_uniform_legacy_reproduces_the_original_truncated_stride():
    # ALPRO.md §4: vlen=100, N=8 -> step floor(12.5) = 12 -> [0, 12, ..., 84]
    assert sample_frames("uniform_legacy", 100, 8).tolist() == [0, 12, 24, 36, 48, 60, 72, 84]
    for vlen, num in [(33, 4), (7, 3), (1000, 16), (10, 3)]:
        assert sample_frames("uniform_legacy", vlen, num).tolist() == np.arange(0, vlen, vlen / num, dtype=int)[
            :num].tolist()


def test_uniform_spans_first_to_last_frame():
    assert sample_frames("uniform", 100, 8).tolist() == [0, 14, 28, 42, 57, 71, 85, 99]
    assert sample_frames("uniform", 5, 1).tolist() == [0]


def test_middle_takes_segment_centres():
    assert sample_frames("middle", 80, 4).tolist() == [9, 29, 49, 69]


@pytest.mark.parametrize("vlen,num", [(100, 4), (37, 8), (9, 8), (16, 16)])
def test_random_samplers_are_sorted_distinct_and_in_range(vlen, num):
    rng = np.random.default_rng(0)
    for _ in range(50):
        for strategy in ("rand", "headtail", "segment"):
            idx = sample_frames(strategy, vlen, num, rng)
            assert len(idx) == num and idx.dtype == np.int64
            assert (np.diff(idx) > 0).all(), (strategy, idx)  # distinct and sorted when vlen >= num
            assert idx.min() >= 0 and idx.max() < vlen


def test_headtail_takes_half_from_each_half():
    rng = np.random.default_rng(1)
    for _ in range(100):
        idx = sample_frames("headtail", 50, 4, rng)
        assert (idx[:2] < 25).all() and (idx[2:] >= 25).all()
    odd = sample_frames("headtail", 50, 5, rng)
    assert len(odd) == 5 and (odd[:2] < 25).all() and (odd[2:] >= 25).all()


def test_segment_draws_one_frame_per_segment():
    rng = np.random.default_rng(2)
    for _ in range(100):
        idx = sample_frames("segment", 40, 4, rng)
        assert [int(i) // 10 for i in idx] == [0, 1, 2, 3]


def test_short_clips_repeat_frames_instead_of_failing():
    rng = np.random.default_rng(3)
    for strategy in ("rand", "headtail", "segment", "uniform", "uniform_legacy", "middle"):
        idx = sample_frames(strategy, 3, 8, rng)
        assert len(idx) == 8 and (np.diff(idx) >= 0).all() and idx.max() < 3, (strategy, idx)
    assert set(sample_frames("rand", 3, 8, rng).tolist()) == {0, 1, 2}  # every frame at least once
    assert sample_frames("headtail", 1, 4, rng).tolist() == [0, 0, 0, 0]


def test_same_generator_state_gives_same_indices_and_bad_inputs_raise():
    a = sample_frames("rand", 500, 8, np.random.default_rng(7))
    b = sample_frames("rand", 500, 8, np.random.default_rng(7))
    assert a.tolist() == b.tolist()
    with pytest.raises(ValueError):
        sample_frames("rand", 10, 4)  # no generator
    with pytest.raises(ValueError):
        sample_frames("fancy", 10, 4)
    with pytest.raises(ValueError):
        sample_frames("uniform", 0, 4)
