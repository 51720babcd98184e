"""The embedded shapes-world corpus (`alpro synth`): determinism, decodable media, captions and QA that agree with
the scene, unique signatures per split, visible objects and motion after a downscale to 32 px, bad arguments."""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import av
import numpy as np
import pytest
from PIL import Image

from alpro.cli import main as cli_main
from alpro.corpus import synth
from alpro.corpus.synth import (
    BACKGROUNDS,
    COLORS,
    COUNT_WORDS,
    DIRECTIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    assign_splits,
    clip_captions,
    clip_questions,
    generate,
    plan_scenes,
    render_clip,
)
from alpro.errors import AlproError

# Tiny media keep the module fast: 96x72 at 12 fps is ~24-96 frames per clip.
OPTS = dict(num_clips=24, num_images=8, seed=7, fps=12, size=(96, 72), progress=False)


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _manifest(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "manifest.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth") / "one_worker"
    generate(root, workers=1, **OPTS)
    return root


@pytest.fixture(scope="module")
def plan() -> list[tuple[str, Scene]]:
    """A default-size plan (2000 clips), no rendering: split and scene statistics need the real counts."""
    rng = np.random.default_rng([0, 0])
    splits = assign_splits(2000, rng)
    return list(zip(splits, plan_scenes(splits, rng, video=True)))


# --- determinism ---------------------------------------------------------------------------------------------------


def test_same_seed_gives_identical_bytes_whatever_the_worker_count(corpus, tmp_path):
    generate(tmp_path / "two_workers", workers=2, **OPTS)
    a, b = _files(corpus), _files(tmp_path / "two_workers")
    assert sorted(a) == sorted(b)
    assert len([k for k in a if k.endswith(".mp4")]) == 24 and len([k for k in a if k.endswith(".jpg")]) == 8
    assert [k for k in a if a[k] != b[k]] == []


def test_another_seed_gives_another_corpus(corpus, tmp_path):
    generate(tmp_path / "other", **{**OPTS, "seed": 8, "num_clips": 3, "num_images": 0}, workers=1)
    first = _manifest(tmp_path / "other")[0]
    assert first["captions"] != _manifest(corpus)[0]["captions"] or first["split"] != _manifest(corpus)[0]["split"]
    assert (tmp_path / "other/videos/clip_000000.mp4").read_bytes() != (corpus / "videos/clip_000000.mp4").read_bytes()


# --- media ---------------------------------------------------------------------------------------------------------


def test_every_clip_decodes_with_the_claimed_fps_size_and_duration(corpus):
    clips = [r for r in _manifest(corpus) if "video" in r]
    saw_b_frames = False
    for r in clips:
        with av.open(str(corpus / r["video"])) as container:
            stream = container.streams.video[0]
            assert stream.codec_context.name == "h264"
            assert stream.average_rate == 12
            frames = list(container.decode(stream))
        assert (frames[0].width, frames[0].height, frames[0].format.name) == (96, 72, "yuv420p")
        assert len(frames) == r["num_frames"]
        assert abs(len(frames) / 12 - r["duration"]) < 1e-5 and 2.0 <= r["duration"] <= 8.0
        assert [f.key_frame for f in frames].count(True) == 1  # source-like: one keyframe per clip (long GOP)
        saw_b_frames |= any(f.pict_type == av.video.frame.PictureType.B for f in frames)
    assert saw_b_frames


def test_images_are_jpegs_of_the_frame_size(corpus):
    images = [r for r in _manifest(corpus) if "image" in r]
    assert len(images) == 8
    for r in images:
        with Image.open(corpus / r["image"]) as im:
            assert (im.format, im.mode, im.size) == ("JPEG", "RGB", (96, 72))


def _red_mask(frame: av.VideoFrame) -> np.ndarray:
    """Pixels of the red object after shrinking the frame to 32x24 (what a tiny model sees)."""
    small = np.asarray(frame.to_image().resize((32, 24), Image.BILINEAR)).astype(int)
    return (small[..., 0] > 150) & (small[..., 1] < 100) & (small[..., 2] < 100)


@pytest.mark.parametrize(("motion", "axis", "sign"), [("moves left", 1, -1), ("moves up", 0, -1), ("grows", None, 1)])
def test_small_object_is_visible_and_its_motion_spans_the_frame_at_32px(tmp_path, motion, axis, sign):
    scene = Scene("grass", (SceneObject("square", "red", "small", motion),))
    path = tmp_path / "clip.mp4"
    render_clip(scene, path, seed=(0, 1), num_frames=48, fps=24, size=(160, 120))
    with av.open(str(path)) as container:
        frames = list(container.decode(video=0))
    # The first and last of 4 sparse frames (segment centres), as a model samples them.
    first, last = (_red_mask(frames[int((k + 0.5) * 48 / 4)]) for k in (0, 3))
    assert first.sum() >= 4 and last.sum() >= 4  # "small" is still several pixels at 32 px
    if axis is None:
        assert last.sum() >= 1.5 * first.sum()  # grows: area up by half between the outer sparse frames
    else:
        side = first.shape[axis]
        shift = np.argwhere(last)[:, axis].mean() - np.argwhere(first)[:, axis].mean()  # argwhere: (row, col)
        assert sign * shift >= 0.3 * side  # travels a good part of the frame between the outer sparse frames


# --- manifest, captions, QA ----------------------------------------------------------------------------------------


def test_manifest_schema_and_relative_paths(corpus):
    records = _manifest(corpus)
    assert len({r["id"] for r in records}) == len(records) == 32
    for r in records:
        media = "video" if "video" in r else "image"
        expected = {"id", media, "captions", "split", "objects", "background"}
        expected |= {"qa", "duration", "num_frames", "fps"} if media == "video" else set()
        assert set(r) == expected
        assert not Path(r[media]).is_absolute() and (corpus / r[media]).is_file()
        assert r[media] == f"{media}s/{r['id']}.{'mp4' if media == 'video' else 'jpg'}"
        assert r["split"] in ("train", "val", "test") and r["background"] in BACKGROUNDS
        keys = {"shape", "color", "size"} | ({"motion"} if media == "video" else set())
        assert all(set(o) == keys for o in r["objects"]) and 1 <= len(r["objects"]) <= 3
        for qa in r.get("qa", ()):
            assert set(qa) == {"question", "answer", "answer_type"} and " " not in qa["answer"]


def test_captions_name_every_attribute(corpus):
    motion_words = {m: synth._VERBS[m] + synth._GERUNDS[m] for m in synth.MOTIONS}
    for r in _manifest(corpus):
        assert 3 <= len(r["captions"]) <= 5 and len(set(r["captions"])) == len(r["captions"])
        for caption in r["captions"]:
            assert r["background"] in caption
            for o in r["objects"]:
                assert f"{o['size']} {o['color']} {o['shape']}" in caption
                if "motion" in o:
                    assert any(f"{o['shape']} {w}" in caption for w in motion_words[o["motion"]]), (caption, o)
                else:
                    assert not any(w in caption for ws in motion_words.values() for w in ws)
        first = r["captions"][0]
        assert all(o.get("motion", "") in first for o in r["objects"])  # the canonical caption: canonical verbs


def _answer_from_scene(question: str, answer_type: str, scene: Scene) -> str:
    """Answer ``question`` from the scene alone, checking that exactly one object fits it."""
    words = set(re.findall(r"[a-z]+", question))
    if answer_type == "count":
        return COUNT_WORDS[len(scene.objects) - 1]
    if answer_type == "background":
        return scene.background
    if answer_type == "shape" and not words & set(COLORS):  # "which shape <motion>?"
        matches = [o for o in scene.objects if question.endswith(f" {o.motion}?")]
    else:
        matches = [o for o in scene.objects if o.shape in words or o.color in words]
    assert len(matches) == 1, (question, scene)
    (o,) = matches
    return {"color": o.color, "shape": o.shape, "direction": DIRECTIONS.get(o.motion, "?")}[answer_type]


def test_qa_answers_follow_from_the_objects_and_are_unambiguous(plan):
    rng = np.random.default_rng(0)
    types = Counter()
    for _, scene in plan[:600]:
        qa = clip_questions(scene, rng)
        assert 3 <= len(qa) <= 6
        assert [q["answer_type"] for q in qa].count("count") == 1
        for q in qa:
            types[q["answer_type"]] += 1
            assert _answer_from_scene(q["question"], q["answer_type"], scene) == q["answer"], q
    assert set(types) == set(synth.ANSWER_TYPES)


def test_answer_distribution_is_not_dominated_by_one_answer(plan):
    rng = np.random.default_rng(1)
    answers = Counter(q["answer"] for _, scene in plan for q in clip_questions(scene, rng))
    assert max(answers.values()) / sum(answers.values()) < 0.10
    assert len(answers) == len(COLORS) + len(SHAPES) + len(COUNT_WORDS) + len(DIRECTIONS) + len(BACKGROUNDS)


# --- splits and signatures -----------------------------------------------------------------------------------------


def test_split_proportions():
    rng = np.random.default_rng(0)
    assert Counter(assign_splits(2000, rng)) == {"train": 1600, "val": 200, "test": 200}
    assert Counter(assign_splits(25, rng)) == {"train": 19, "val": 3, "test": 3}
    assert assign_splits(1, rng) == ["train"] and assign_splits(0, rng) == []


def _one_edit_apart(a: Scene, b: Scene) -> bool:
    """True if b is a with one attribute changed or one object added / removed."""
    oa, ob = set(a.objects), set(b.objects)
    if a.background != b.background:
        return oa == ob
    if abs(len(oa) - len(ob)) == 1:
        return oa < ob or ob < oa
    if len(oa - ob) != 1 or len(ob - oa) != 1:
        return False
    (x,), (y,) = oa - ob, ob - oa
    return sum(getattr(x, f) != getattr(y, f) for f in ("shape", "color", "size", "motion")) == 1


def test_signatures_are_unique_and_test_neighbours_often_differ_by_one_attribute(plan):
    signatures = [scene.signature() for _, scene in plan]
    assert len(set(signatures)) == len(signatures)
    test = [scene for split, scene in plan if split == "test"]
    with_neighbour = sum(any(_one_edit_apart(s, t) for t in test if t is not s) for s in test)
    assert with_neighbour / len(test) >= 0.4
    assert all(synth.is_valid_scene(scene, video=True) for _, scene in plan)


def test_captions_of_a_one_edit_pair_differ(plan):
    rng = np.random.default_rng(2)
    test = [scene for split, scene in plan if split == "test"]
    a, b = next((s, t) for s in test for t in test if _one_edit_apart(s, t))
    assert clip_captions(a, rng)[0] != clip_captions(b, rng)[0]


# --- side files ----------------------------------------------------------------------------------------------------


def test_entities_file_counts_caption_nouns_most_frequent_first(corpus):
    lines = (corpus / "entities.txt").read_text().splitlines()
    pairs = [(w, int(n)) for w, n in (line.split(" ") for line in lines)]
    assert [n for _, n in pairs] == sorted((n for _, n in pairs), reverse=True)
    words = dict(pairs)
    assert set(words) <= set(SHAPES) | set(BACKGROUNDS) | set(synth._CAPTION_NOUNS)
    captions = [c for r in _manifest(corpus) for c in r["captions"]]
    for word in ("background", *{o["shape"] for r in _manifest(corpus) for o in r["objects"]}):
        assert words[word] == sum(re.findall(r"[a-z]+", c).count(word) for c in captions)


def test_corpus_json_counts_and_vocabularies(corpus):
    info = json.loads((corpus / "corpus.json").read_text())
    records = _manifest(corpus)
    assert info["seed"] == 7 and info["options"]["fps"] == 12 and info["options"]["width"] == 96
    for split, counts in info["counts"].items():
        assert counts["clips"] == sum(1 for r in records if r["split"] == split and "video" in r)
        assert counts["images"] == sum(1 for r in records if r["split"] == split and "image" in r)
    assert sum(c["clips"] for c in info["counts"].values()) == 24
    for r in records:
        for qa in r.get("qa", ()):
            assert qa["answer"] in info["answers"][qa["answer_type"]]
    assert info["vocab"]["sizes"] == list(SIZES)
    assert info["totals"]["frames"] == sum(r["num_frames"] for r in records if "video" in r)


# --- user errors ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_clips": -1}, "--num-clips must be an integer >= 0"),
        ({"num_images": -5}, "--num-images must be an integer >= 0"),
        ({"workers": 0}, "--workers must be an integer >= 1"),
        ({"fps": 0}, "--fps must be an integer >= 1"),
        ({"num_clips": 0, "num_images": 0}, "nothing to generate"),
        ({"size": (97, 72)}, "must be even"),
    ],
)
def test_bad_arguments_raise_one_line_errors(tmp_path, kwargs, message):
    with pytest.raises(AlproError, match=re.escape(message)) as e:
        generate(tmp_path / "out", **{**OPTS, **kwargs})
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out").exists()


def test_bad_size_strings():
    for text in ("160", "160x", "axb", "32x24", "160x121"):
        with pytest.raises(AlproError, match="--size"):
            synth.parse_size(text)
    assert synth.parse_size(" 192X144 ") == (192, 144)


def test_unwritable_or_non_directory_out_dir(tmp_path):
    afile = tmp_path / "afile"
    afile.write_text("keep me")
    with pytest.raises(AlproError, match="not a directory"):
        generate(afile, **OPTS)
    with pytest.raises(AlproError, match="cannot write to"):
        generate(afile / "sub", **OPTS)
    assert afile.read_text() == "keep me"


def test_non_empty_out_dir_needs_overwrite_which_replaces_only_the_corpus(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    argv = ["synth", str(out), "--num-clips", "4", "--num-images", "1", "--fps", "12", "--size", "96x72", "--quiet"]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("alpro synth: error:") and "--overwrite" in err and "\n" not in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]

    assert cli_main([*argv, "--overwrite", "--workers", "1"]) == 0
    assert re.search(r"4 clips .* and 1 images", capsys.readouterr().out)
    assert cli_main([*argv[:3], "2", *argv[4:], "--overwrite", "--workers", "1"]) == 0
    assert sorted(p.name for p in (out / "videos").iterdir()) == ["clip_000000.mp4", "clip_000001.mp4"]
    assert len(_manifest(out)) == 3 and (out / "notes.txt").read_text() == "mine"
