"""The demo's 'what was learned' report: per-attribute top-1 agreement, QA baselines per type, the plot and the
results table, on crafted corpora and score matrices."""

from __future__ import annotations

import json

import pytest
import torch

from alpro.apps.demo import results_table
from alpro.apps.demo_report import build_report, per_attribute_retrieval, plot, qa_baselines, read_manifest
from alpro.errors import AlproError


def _clip(cid: str, bg: str, objects: list[tuple[str, str, str]], split: str = "test", qa=()) -> dict:
    return {"id": cid, "split": split, "background": bg,
            "objects": [{"shape": s, "color": c, "size": "big", "motion": m} for s, c, m in objects],
            "qa": [{"question": "q", "answer": a, "answer_type": t} for t, a in qa]}


@pytest.fixture()
def corpus(tmp_path):
    items = [
        _clip("a", "sand", [("circle", "red", "moves left")], qa=[("color", "red"), ("count", "one")]),
        _clip("b", "sand", [("square", "red", "spins")], qa=[("color", "red"), ("count", "one")]),
        _clip("c", "grass", [("circle", "blue", "moves left"), ("star", "red", "spins")],
              qa=[("color", "blue"), ("count", "two")]),
        _clip("d", "snow", [("heart", "green", "grows")], qa=[("color", "green"), ("count", "one")]),
        _clip("t1", "sky", [("heart", "green", "grows")], split="train", qa=[("color", "green"), ("count", "two")]),
        _clip("t2", "sky", [("heart", "green", "grows")], split="train", qa=[("color", "green"), ("count", "two")]),
        _clip("t3", "sky", [("heart", "red", "grows")], split="train", qa=[("color", "red"), ("count", "one")]),
    ]
    (tmp_path / "manifest.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    answers = {"color": ["red", "green", "blue", "white"], "count": ["one", "two", "three"]}
    (tmp_path / "corpus.json").write_text(json.dumps({"answers": answers}))
    return tmp_path


def test_per_attribute_retrieval_counts_what_the_top_clip_shares(corpus):
    meta = read_manifest(corpus)
    keys = ["a", "b", "c", "d"]
    # Text 0 (clip a) ranks b first: same background, colour set and count; other shape and motion.
    # Text 1 (clip c) ranks c first: everything agrees. Text 2 (clip d) ranks a first: only the count agrees.
    t2v = torch.tensor([[0.1, 0.9, 0.0, 0.0], [0.0, 0.0, 1.0, 0.2], [0.5, 0.1, 0.0, 0.3]])
    out = per_attribute_retrieval(t2v, [0, 2, 3], keys, meta)
    assert out["background"]["acc"] == pytest.approx(200 / 3)
    assert out["color"]["acc"] == pytest.approx(200 / 3)
    assert out["shape"]["acc"] == pytest.approx(100 / 3)
    assert out["motion"]["acc"] == pytest.approx(100 / 3)
    assert out["count"]["acc"] == pytest.approx(100.0)
    assert out["clip (R@1)"] == {"acc": pytest.approx(100 / 3), "chance": 25.0}
    # Chance: clips agreeing with the query's clip. Background: a -> {a, b}, c -> {c}, d -> {d}.
    assert out["background"]["chance"] == pytest.approx(100 * (2 / 4 + 1 / 4 + 1 / 4) / 3)
    # Count: a -> 3 one-object clips, c -> 1 two-object clip, d -> 3.
    assert out["count"]["chance"] == pytest.approx(100 * (3 / 4 + 1 / 4 + 3 / 4) / 3)


def test_per_attribute_retrieval_rejects_unknown_clips_and_bad_shapes(corpus):
    meta = read_manifest(corpus)
    with pytest.raises(AlproError, match="'zz'.*not in the corpus manifest"):
        per_attribute_retrieval(torch.zeros(1, 2), [0], ["a", "zz"], meta)
    with pytest.raises(ValueError, match="does not match"):
        per_attribute_retrieval(torch.zeros(2, 2), [0], ["a", "b"], meta)


def test_qa_baselines_use_the_training_majority_and_the_answer_vocabulary(corpus):
    base = qa_baselines(read_manifest(corpus), corpus)
    assert base["color"]["chance"] == pytest.approx(25.0)  # 4 colour answers
    assert base["count"]["chance"] == pytest.approx(100 / 3)
    # Training majority: colour "green" (2 of 3), count "two" (2 of 3); test answers: one of 4 green, one of 4 two.
    assert (base["color"]["majority_answer"], base["color"]["majority"]) == ("green", 25.0)
    assert (base["count"]["majority_answer"], base["count"]["majority"]) == ("two", 25.0)
    assert base["color"]["n"] == 4


def test_report_plot_and_table(corpus, tmp_path):
    qa = {"acc": 50.0, "n": 8, "majority_acc": 25.0, "acc_color": 75.0, "acc_count": 25.0}
    (tmp_path / "qa.json").write_text(json.dumps(qa))
    report = build_report(None, corpus, tmp_path / "qa.json")
    assert report["qa"]["color"] == {"acc": 75.0, "chance": 25.0, "majority": 25.0, "majority_answer": "green",
                                     "n": 4.0}
    t2v = torch.eye(4)[:3]
    report["retrieval"] = {"vtc": per_attribute_retrieval(t2v, [0, 1, 2], ["a", "b", "c", "d"],
                                                          read_manifest(corpus))}
    png = plot(report, tmp_path / "out" / "learned.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    retrieval = {"n_videos": 4.0, "chance_r1": 25.0, "chance_r5": 100.0, "chance_r10": 100.0,
                 "lavis_t2v_r1": 50.0, "vtc_t2v_r1": 25.0, "lavis_t2v_r5": 100.0, "lavis_t2v_r10": 100.0, "original_t2v_r1": 75.0}
    table = results_table(retrieval, qa, report)
    assert "| video QA, 4 color questions | accuracy | 75.0 | 25.0 (chance), 25.0 (majority) | 3.0x chance |" in table
    assert "(4 clips, original protocol) | R@1 | 75.0 | 25.0 (chance) | 3.0x |" in table
    assert "(4 clips, VTC alone, before re-ranking) | R@1 | 25.0 | 25.0 (chance) | 1.0x |" in table


def test_unreadable_inputs_are_one_line_errors(tmp_path):
    with pytest.raises(AlproError, match="manifest.jsonl: cannot read the corpus manifest"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.jsonl").write_text('{"id": "a"}\nnot json\n')
    with pytest.raises(AlproError, match=r"manifest.jsonl:2: not a corpus item"):
        read_manifest(tmp_path)
