"""End-to-end loader behaviour on tiny shards: batch contents, splitting, exact resume, evaluation, QA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from alpro.config import from_dict
from alpro.data import (
    CLIP_MEAN,
    CLIP_STD,
    DataConfig,
    build_answer_vocab,
    build_eval_loader,
    build_tokenizer,
    build_train_loader,
    corpus_texts,
)
from alpro.data.pem import patch_mask
from alpro.data.plan import choose_source
from alpro.data.protocol import BatchSource
from alpro.errors import AlproError


@pytest.fixture(scope="module")
def corpus(loader_shards):
    return loader_shards


def make_cfg(corpus, **kw) -> DataConfig:
    base = {"train": {"video": str(corpus["video"]), "image": str(corpus["image"])},
            "val": {"video": str(corpus["video"])}, "frame_size": 32, "num_frames": 4, "batch_size": 2,
            "num_workers": 0, "max_text_len": 16, "pem": {"patch_size": 8}}
    for key, value in kw.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            base[key] = {**base[key], **value}
        else:
            base[key] = value
    return from_dict(DataConfig, base)


@pytest.fixture(scope="module")
def tok(corpus):
    return build_tokenizer(train_texts=corpus_texts(make_cfg(corpus), "qa") + corpus_texts(make_cfg(corpus),
                                                                                           "pretrain"))


def test_pretrain_batches_have_every_field_alpro_needs(corpus, tok):
    cfg = make_cfg(corpus)
    loader = build_train_loader(cfg, "pretrain", tok, rank=0, world_size=1, seed=3)
    assert len(loader) == 4 + 2  # 8 clips / 2 + 5 images // 2 (drop last)
    kinds = set()
    for batch in loader:
        kinds.add(batch.type)
        assert batch.video.shape == (2, 3, 4, 32, 32) and batch.video.dtype == torch.float32
        assert batch.input_ids.shape == batch.attention_mask.shape == batch.mlm_labels.shape == (2, 16)
        sel = batch.mlm_labels != -100
        assert torch.equal(batch.mlm_input_ids[~sel], batch.input_ids[~sel])
        assert torch.equal(batch.pem_mask, patch_mask(batch.pem_box, 32, 32, 8))
        assert batch.pem_mask.shape == (2, 16) and (batch.pem_mask.sum(1) > 0).all()
        top, left, h, w = batch.pem_box[0].tolist()
        zero = (-torch.tensor(CLIP_MEAN) / torch.tensor(CLIP_STD)).view(3, 1, 1)
        assert torch.equal(batch.crop_video[0, :, :, top : top + h, left : left + w],
                           batch.video[0, :, :, top : top + h, left : left + w])
        torch.testing.assert_close(batch.crop_video[0, :, 0, :top, :], zero.expand(3, top, 32))
        assert len(batch.keys) == len(batch.texts) == 2 and all(batch.texts)
        if batch.type == "image":
            assert all(torch.equal(batch.video[:, :, 0], batch.video[:, :, t]) for t in range(1, 4))
            assert all(k.startswith("i") for k in batch.keys)
        else:
            assert all(k.startswith("v") for k in batch.keys)
            assert not torch.equal(batch.video[:, :, 0], batch.video[:, :, 3])  # a moving pattern
        assert batch.valid is None and batch.all_texts is None  # training batches are always full
    assert kinds == {"video", "image"}
    m = loader.metrics()
    assert m["clips_per_s"] > 0 and m["skipped"] == 0 and 1 <= m["decoded_per_delivered"] <= 8


def test_mixing_is_a_function_of_seed_and_step_with_the_configured_weights():
    choices = [choose_source(42, s, [0.5, 0.5]) for s in range(4000)]
    assert abs(np.mean(choices) - 0.5) < 0.03
    assert choices == [choose_source(42, s, [0.5, 0.5]) for s in range(4000)]  # every rank computes the same
    assert abs(np.mean([choose_source(1, s, [0.8, 0.2]) for s in range(4000)]) - 0.2) < 0.03


def _epoch_keys(cfg, tok, rank, world, seed=0, task="pretrain"):
    loader = build_train_loader(cfg, task, tok, rank=rank, world_size=world, seed=seed)
    return [k for batch in loader for k in batch.keys]


def test_two_ranks_two_workers_cover_the_epoch_without_duplicates(corpus, tok):
    cfg = make_cfg(corpus, train={"image": None}, num_workers=2)
    per_rank = [_epoch_keys(cfg, tok, r, 2) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1]) == 4  # 8 clips / (2 per batch x 2 ranks) = 2 batches each
    everything = per_rank[0] + per_rank[1]
    assert sorted(everything) == [f"v{i:03d}" for i in range(8)]  # no duplicates, no gaps
    assert per_rank[0] == _epoch_keys(make_cfg(corpus, train={"image": None}, num_workers=0), tok, 0, 2)
    second = build_train_loader(cfg, "pretrain", tok, 0, 2, seed=0)
    first_pass = [b.keys for b in second]
    assert [b.keys for b in second] != first_pass  # the next epoch is reshuffled


def _run(loader, n):
    out = []
    for batch in loader:
        out.append(batch)
        if len(out) == n:
            break
    return out


@pytest.mark.parametrize("workers_after", [0, 2])
def test_resume_mid_epoch_reproduces_the_uninterrupted_run(corpus, tok, workers_after):
    cfg = make_cfg(corpus, num_workers=1, resampled=True)
    reference = build_train_loader(cfg, "pretrain", tok, 0, 1, seed=5)
    full = _run(reference, 9)  # crosses the 6-step pass boundary (resampled: one endless iteration)
    interrupted = build_train_loader(cfg, "pretrain", tok, 0, 1, seed=5)
    _run(interrupted, 4)
    state = interrupted.state_dict()
    assert state["step"] == 4 and len(str(state)) < 400  # positions and seeds only
    resumed = build_train_loader(make_cfg(corpus, num_workers=workers_after, resampled=True), "pretrain", tok, 0, 1,
                                 seed=5)
    resumed.load_state_dict(state)
    planned = list(resumed.plan(steps=5))
    rest = _run(resumed, 5)
    for want, got, plan in zip(full[4:], rest, planned):
        assert got.keys == want.keys == [item["key"] for item in plan["items"]]
        assert got.type == want.type == plan["type"]
        assert torch.equal(got.video, want.video) and torch.equal(got.mlm_input_ids, want.mlm_input_ids)
        assert torch.equal(got.pem_box, want.pem_box)
    with pytest.raises(AlproError, match="batch_size"):
        build_train_loader(make_cfg(corpus, batch_size=1), "pretrain", tok, 0, 1, seed=5).load_state_dict(state)


def test_states_in_the_format_of_the_loaders_before_the_shell_still_resume(corpus, tok):
    """The shell writes the layout each path wrote on its own before (version 1): a state spelled out by hand in
    that layout resumes exactly, the streaming one without the ``rank`` it never had; a state of another
    back-end or of other settings is refused with one line."""
    cfg = make_cfg(corpus, resampled=True)
    full = _run(build_train_loader(cfg, "pretrain", tok, 0, 1, seed=5), 7)
    sources, per_epoch = [[0, 0], [0, 0]], [4, 2]  # 8 clips and 5 images in batches of 2 (drop last)
    for step in range(4):
        source = choose_source(5, step, [0.5, 0.5])
        epoch, batch = sources[source]
        sources[source] = [epoch + 1, 0] if batch + 1 == per_epoch[source] else [epoch, batch + 1]
    old = {"version": 1, "mode": "indexed", "task": "pretrain", "seed": 5, "rank": 0, "world_size": 1,
           "batch_size": 2, "kinds": ["video", "image"], "step": 4, "sources": sources}
    resumed = build_train_loader(cfg, "pretrain", tok, 0, 1, seed=5)
    assert isinstance(resumed.source, BatchSource) and resumed.source.mode == "indexed"
    resumed.load_state_dict(old)
    assert resumed.state_dict() == old
    for want, got in zip(full[4:], _run(resumed, 3)):
        assert got.keys == want.keys and torch.equal(got.video, want.video)

    video = corpus["video"]
    stream_cfg = make_cfg(corpus, train={"video": f"pipe:cat {video}/shard-{{000000..000002}}.tar", "image": None,
                                         "video_index": str(video / "index.json.zst")}, stream_buffer=3,
                          resampled=True)
    reference = _run(build_train_loader(stream_cfg, "pretrain", tok, 0, 1, seed=3), 4)
    interrupted = build_train_loader(stream_cfg, "pretrain", tok, 0, 1, seed=3)
    _run(interrupted, 2)
    state = interrupted.state_dict()
    assert isinstance(interrupted.source, BatchSource)
    assert state["mode"] == "stream" and state.pop("rank") == 0  # the old streaming state had no rank
    resumed = build_train_loader(stream_cfg, "pretrain", tok, 0, 1, seed=3)
    resumed.load_state_dict(state)
    for want, got in zip(reference[2:], _run(resumed, 2)):
        assert got.keys == want.keys and torch.equal(got.video, want.video)

    with pytest.raises(AlproError, match="mode stream.*not an indexed-loader state") as err:
        build_train_loader(cfg, "pretrain", tok, 0, 1, seed=5).load_state_dict(state)
    assert "\n" not in str(err.value)
    with pytest.raises(AlproError, match="different seed.*now") as err:
        build_train_loader(cfg, "pretrain", tok, 0, 1, seed=6).load_state_dict(old)
    assert "\n" not in str(err.value)


def test_plan_describes_frames_and_augmentation_without_decoding(corpus, tok):
    loader = build_train_loader(make_cfg(corpus, train={"image": None}), "pretrain", tok, 0, 1, seed=9)
    steps = list(loader.plan(steps=2))
    again = list(build_train_loader(make_cfg(corpus, train={"image": None}), "pretrain", tok, 0, 1, seed=9).plan(2))
    assert steps == again and len(steps) == 2
    item = steps[0]["items"][0]
    assert len(item["frames"]) == 4 and item["frames"] == sorted(item["frames"])
    assert item["frames"][1] < 24 <= item["frames"][2]  # headtail on 48-frame clips
    assert item["clip"].crop is not None and len(item["clip"].ops) == 2 and item["box"] is not None


def test_eval_covers_every_clip_once_in_order_across_ranks(corpus, tok):
    cfg = make_cfg(corpus, eval_batch_size=2, num_workers=1)
    seen, counts = [], set()
    for rank in range(3):
        loader = build_eval_loader(cfg, "retrieval", tok, rank=rank, world_size=3)
        counts.add(len(loader))
        for batch in loader:
            assert batch.video.shape == (2, 3, 4, 32, 32) and batch.valid.dtype == torch.bool
            assert batch.mlm_labels is None and batch.pem_box is None
            for key, ok, texts in zip(batch.keys, batch.valid.tolist(), batch.all_texts):
                if ok:
                    seen.append(key)
                    assert len(texts) == 2 and texts[0].startswith("clip number")
                else:
                    assert key == "" and texts == []
    assert counts == {2}  # every rank the same number of batches
    assert seen == [f"v{i:03d}" for i in range(8)]


def test_eval_uses_uniform_frames_and_no_augmentation(corpus, tok):
    loader = build_eval_loader(make_cfg(corpus, eval_num_frames=3), "pretrain", tok, 0, 1)
    item = next(loader.plan())["items"][0]
    assert item["frames"] == [0, 24, 47] and item["clip"].ops == () and item["box"] is None
    first = next(iter(loader))
    assert torch.equal(first.video, next(iter(loader)).video)  # deterministic


def test_qa_has_one_item_per_question_and_answer_labels(corpus, tok):
    vocab = build_answer_vocab(str(corpus["video"]), top_k=2)
    assert len(vocab) == 2 and set(vocab) <= {"red", "blue", "green"}
    cfg = make_cfg(corpus, val={"video": str(corpus["video"])})
    loader = build_eval_loader(cfg, "qa", tok, 0, 1, answer_vocab=vocab)
    questions = [(k, t, a, i) for b in loader for k, t, a, i, ok in
                 zip(b.keys, b.texts, b.answers, b.answer_ids.tolist(), b.valid.tolist()) if ok]
    assert len(questions) == 16  # 8 clips x 2 questions
    assert all(t.startswith("what color") for _, t, _, _ in questions)
    assert all(i == vocab.get(a, -100) for _, _, a, i in questions)
    train = build_train_loader(cfg, "qa", tok, 0, 1, seed=0, answer_vocab=vocab)
    assert len(train) == 8
    batch = next(iter(train))
    assert batch.answer_types == ["color", "color"] and batch.mlm_labels is None and batch.pem_box is None


def test_retrieval_training_has_one_item_per_caption_or_per_video(corpus, tok):
    per_caption = build_train_loader(make_cfg(corpus), "retrieval", tok, 0, 1, seed=0)
    assert len(per_caption) == 8  # 16 (clip, caption) pairs, batch 2; image shards are not used
    texts = [t for b in per_caption for t in b.texts]
    assert len(set(texts)) == 16
    per_video = build_train_loader(make_cfg(corpus, retrieval_items="per_video"), "retrieval", tok, 0, 1, seed=0)
    assert len(per_video) == 4
    paragraph = build_eval_loader(make_cfg(corpus, paragraph=True), "retrieval", tok, 0, 1)
    batch = next(iter(paragraph))
    assert batch.texts[0] == "clip number 0 shows a moving square caption two of clip 0"
    assert batch.all_texts[0] == [batch.texts[0]]


def test_bad_configuration_is_one_clear_error(corpus, tok, tmp_path):
    with pytest.raises(AlproError, match="data.train.video is not set"):
        build_train_loader(make_cfg(corpus, train={"video": None}), "pretrain", tok, 0, 1, seed=0)
    with pytest.raises(AlproError, match="no shard matches"):
        build_train_loader(make_cfg(corpus, train={"video": str(tmp_path / "x-{0..3}.tar")}), "retrieval", tok, 0, 1,
                           seed=0)
    with pytest.raises(AlproError, match="less than one global batch"):
        build_train_loader(make_cfg(corpus, batch_size=8), "pretrain", tok, 0, 2, seed=0)


def test_pipe_sources_stream_and_resume_exactly_with_the_same_workers(corpus, tok):
    video = corpus["video"]
    cfg = make_cfg(corpus, train={"video": f"pipe:cat {video}/shard-{{000000..000002}}.tar", "image": None,
                                  "video_index": str(video / "index.json.zst")},
                   num_workers=2, stream_buffer=3, resampled=True)
    full = _run(build_train_loader(cfg, "pretrain", tok, 0, 1, seed=3), 6)
    first = build_train_loader(cfg, "pretrain", tok, 0, 1, seed=3)
    assert len(first) == 4 and type(first.source).__name__ == "StreamSource"
    _run(first, 3)
    state = first.state_dict()
    resumed = build_train_loader(cfg, "pretrain", tok, 0, 1, seed=3)
    resumed.load_state_dict(state)
    for want, got in zip(full[3:], _run(resumed, 3)):
        assert got.keys == want.keys and torch.equal(got.video, want.video)
    assert all(k.startswith("v") for b in full for k in b.keys) and full[0].pem_box is not None
    texts = corpus_texts(cfg, "pretrain", limit=5)  # tokenizer corpus from a stream: front to back
    assert len(texts) == 5 * 6 and texts[:3] == ["clip number 0 shows a moving square", "caption two of clip 0",
                                        "what color is thing 0 0"]
    without_index = make_cfg(corpus, train={"video": f"pipe:cat {video}/shard-000000.tar", "image": None})
    with pytest.raises(AlproError, match="video_index"):
        build_train_loader(without_index, "pretrain", tok, 0, 1, seed=0)


def test_every_shard_spec_form_lists_the_same_samples(corpus, tmp_path):
    from alpro.data.shards import resolve

    video = corpus["video"]
    forms = [str(video), str(video / "index.json.zst"), str(video / "shard-*.tar"),
             str(video / "shard-{000000..000002}.tar"),
             [str(video / "shard-000000.tar"), str(video / "shard-00000[12].tar")]]
    keys = [[resolve(f, "x").key(i) for i in range(8)] for f in forms]
    assert all(k == keys[0] for k in keys) and keys[0][0] == "v000"
    assert resolve(str(video), "x").options["codec"] == "h264"


def test_fsspec_urls_read_through_the_index(corpus, tok):
    import fsspec
    fs = fsspec.filesystem("memory")
    for path in corpus["video"].iterdir():
        if path.suffix in (".tar", ".zst"):
            fs.pipe(f"/alpro-test/{path.name}", path.read_bytes())
    cfg = make_cfg(corpus, val={"video": "memory://alpro-test/index.json.zst"})
    local = [b.keys for b in build_eval_loader(make_cfg(corpus), "retrieval", tok, 0, 1)]
    remote = build_eval_loader(cfg, "retrieval", tok, 0, 1)
    assert [b.keys for b in remote] == local
