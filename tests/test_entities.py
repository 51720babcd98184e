"""`alpro entities`: the model-free noun heuristic, every caption source, the unigrams.txt format, errors."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from alpro.corpus.entities import heuristic_nouns, main, read_entities, read_unigrams
from alpro.errors import AlproError


@pytest.mark.parametrize("caption, nouns", [
    ("a man in a red shirt is riding a horse", ["man", "shirt", "horse"]),
    ("A red circle moves left.", ["circle"]),
    ("the big brown dog jumps over two small cats", ["dog", "cats"]),  # plurals stay separate entries
    ("a woman cooking pasta in her kitchen", ["woman", "kitchen"]),
    ("a building", ["building"]),  # every word looks adjectival: the last one is the head
    ("running fast", []),  # no determiner-led phrase
])
def test_heuristic_finds_phrase_heads(caption, nouns):
    assert heuristic_nouns(caption) == nouns


def _tar(path, members: dict[str, str]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, text in members.items():
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_counts_shards_manifest_and_text(tmp_path, capsys):
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar(shards / "shard-000000.tar", {"a.json": "{}", "a.txt": "a red circle spins\na circle moves",
                                       "b.txt": "the square and the circle"})
    _tar(shards / "shard-000001.tar", {"c.txt": "a blue square"})
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"video": "v/a.mp4", "captions": ["a triangle", "the circle"]}) + "\n\n"
                        + json.dumps({"video": "v/b.mp4", "caption": "one square"}) + "\n")
    text = tmp_path / "caps.txt"
    text.write_text("a star\n\na star and a moon\n")
    out = tmp_path / "unigrams.txt"
    assert main(["--shards", str(shards / "shard-{000000..000001}.tar"), "--manifest", str(manifest),
                 "--text", str(text), "--out", str(out), "--tagger", "heuristic"]) == 0
    assert out.read_text().splitlines() == ["circle 4", "square 3", "star 2", "moon 1", "triangle 1"]
    assert "from 9 captions (heuristic tagger)" in capsys.readouterr().out
    assert main(["--shards", str(shards), "--out", str(out), "--top", "1", "--tagger", "heuristic"]) == 0
    assert read_unigrams(out) == [("circle", 3)]


def test_user_entity_list_is_checked_and_trimmed(tmp_path):
    given = tmp_path / "mine.txt"
    given.write_text("dog 10\ncat 7\n\nbird\n")
    out = tmp_path / "unigrams.txt"
    assert main(["--entities", str(given), "--out", str(out), "--top", "2"]) == 0
    assert out.read_text() == "dog 10\ncat 7\n"
    assert read_entities(given) == ["dog", "cat", "bird"] and read_entities(given, limit=1) == ["dog"]
    given.write_text("dog 10\nhot dog 3\n")
    with pytest.raises(AlproError, match=r"mine.txt:2: expected 'word count'"):
        main(["--entities", str(given), "--out", str(out)])


def test_bad_inputs_are_one_line_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"video": "a.mp4", "caption": "a dog"}\n{oops\n')
    out = tmp_path / "u.txt"
    with pytest.raises(AlproError, match=r"bad.jsonl:2: invalid JSON"):
        main(["--manifest", str(bad), "--out", str(out)])
    with pytest.raises(AlproError, match="file not found"):
        main(["--text", str(tmp_path / "missing.txt"), "--out", str(out)])
    with pytest.raises(AlproError, match=r"--shards: no shard matches .*\(.*none-0.tar does not exist\)"):
        main(["--shards", str(tmp_path / "none-{0..1}.tar"), "--out", str(out)])
    with pytest.raises(AlproError, match="--shards: no shards found"):
        main(["--shards", str(tmp_path), "--out", str(out)])
    with pytest.raises(AlproError, match="give captions"):
        main(["--out", str(out)])
    (tmp_path / "empty.txt").write_text("running fast\n")
    with pytest.raises(AlproError, match="no nouns found in 1 captions"):
        main(["--text", str(tmp_path / "empty.txt"), "--out", str(out)])
    assert not out.exists()  # nothing half-written
