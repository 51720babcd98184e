"""``alpro entities``: build the PEM entity list from corpus captions (the paper: "the top 1k most frequent
nouns" of the pre-training captions, found with a POS tagger).

    alpro entities --shards 'data/shards/shard-{000000..000009}.tar' --out unigrams.txt --top 1000
    alpro entities --manifest corpus.jsonl --text extra_captions.txt --out unigrams.txt
    alpro entities --entities my_list.txt --out unigrams.txt --top 500      # use (and check) your own list

Output is the original's ``unigrams.txt`` format: ``word count`` per line, most frequent first; the model
reads the first word of the first ``num_entities`` lines (:func:`read_entities`).

Noun finding: spaCy when an English pipeline is installed (``--tagger spacy``; plural forms are kept as their
own entries, as in the paper's examples "cats", "mountains"), otherwise a model-free heuristic
(``--tagger heuristic``, the default when spaCy is unavailable): in each caption, every phrase that starts
after a determiner, number or possessive ("a", "the", "two", "his", ...) and runs until a function word or
punctuation yields its head noun -- the first word that does not look like an adjective (a built-in list of
colours, sizes and common adjectives, or an -ous/-ful/-ive/-less/-ish/-ing/-ed ending), or the phrase's last
word if all do. "a man in a red shirt is riding a horse" -> man, shirt, horse.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from alpro.config import option, parse_command
from alpro.errors import AlproError
from alpro.fileio import atomic_write

DETERMINERS = frozenset(
    "a an the this that these those his her their its my your our some many several few each every another "
    "two three four five six seven eight nine ten one".split()
)
FUNCTION_WORDS = DETERMINERS | frozenset(
    "and or but nor so yet of in on at to for with from by about into onto over under above below between "
    "through during before after behind near across along around against among up down out off while as than "
    "is are was were be been being am do does did has have had having will would can could should may might "
    "must shall not no it he she they we you i me him them us who whom which what where when why how there "
    "here then also very too just".split()
)
ADJECTIVES = frozenset(
    "red green blue yellow orange purple pink brown black white gray grey golden silver dark light bright cyan "
    "magenta violet beige teal turquoise navy maroon crimson "
    "big small large little tiny huge long short tall high low wide narrow thick thin old young new "
    "good bad great beautiful pretty happy sad cute funny nice fat slow fast quick hot cold warm cool wet dry "
    "empty full open closed clean dirty heavy soft hard round square flat front back top bottom left right "
    "first last other same different single double whole real main close far next own".split()
)
ADJECTIVE_SUFFIXES = ("ous", "ful", "ive", "less", "ish", "ing", "ed")
WORD = re.compile(r"[a-z]+|[^a-z\s]")


def _is_adjective_like(word: str) -> bool:
    return word in ADJECTIVES or (len(word) > 4 and word.endswith(ADJECTIVE_SUFFIXES))


def heuristic_nouns(caption: str, max_phrase: int = 4) -> list[str]:
    """Head nouns of the determiner-led phrases of ``caption`` (see the module docstring)."""
    tokens = WORD.findall(caption.lower())
    nouns = []
    for i, tok in enumerate(tokens):
        if tok not in DETERMINERS:
            continue
        phrase = []
        for nxt in tokens[i + 1:i + 1 + max_phrase]:
            if nxt in FUNCTION_WORDS or not nxt.isalpha():
                break
            phrase.append(nxt)
        if phrase:
            head = next((w for w in phrase if not _is_adjective_like(w)), phrase[-1])
            if len(head) >= 2:
                nouns.append(head)
    return nouns


def spacy_tagger(model: str | None = None):
    """A function caption -> nouns backed by an installed spaCy English pipeline, or None if there is none."""
    try:
        import spacy
    except ImportError:
        return None
    for name in ([model] if model else ["en_core_web_sm", "en_core_web_md", "en_core_web_lg", "en_core_web_trf"]):
        try:
            nlp = spacy.load(name, disable=["ner", "parser", "lemmatizer"])
        except OSError:
            continue
        return lambda caption: [t.lower_ for t in nlp(caption) if t.pos_ == "NOUN" and t.is_alpha]
    return None


# -------------------------------------------------------------------------------------------------------- input


def captions_from_shards(spec: str) -> Iterator[str]:
    """Captions of a shard set (whatever :func:`alpro.data.shards.resolve` accepts: a directory, its index, a
    tar, a glob or brace pattern), read as the loader reads them (the metadata's captions, else the ``.txt``
    lines). A sample that cannot be read is an error: a silently smaller count would change the list."""
    from alpro.data.samples import captions_of, read_meta
    from alpro.data.shards import SampleError, resolve
    from alpro.data.sources import iter_heads

    shardset = resolve(spec, "--shards")
    for found in iter_heads(shardset, lambda members: captions_of(read_meta(members), members)):
        if isinstance(found, SampleError):
            raise AlproError(f"--shards {spec}: a sample cannot be read ({found})")
        yield from found


def captions_from_manifest(path: Path) -> Iterator[str]:
    """Captions of a manifest in any format the sharder reads (:func:`alpro.sharding.manifest.read_manifest`)."""
    from alpro.sharding.manifest import read_manifest

    for row in read_manifest(path).rows:
        yield from (c for c in row.captions or [] if c.strip())


def captions_from_text(path: Path) -> Iterator[str]:
    with _open(path) as f:
        yield from (line.strip() for line in f if line.strip())


def _open(path: Path):
    if not Path(path).is_file():
        raise AlproError(f"file not found: {path}")
    return open(path, encoding="utf-8")


def read_unigrams(path: str | Path) -> list[tuple[str, int]]:
    """Parse a ``word count`` file (count optional); blank lines are skipped, malformed ones are errors."""
    out = []
    with _open(Path(path)) as f:
        for n, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) > 2 or (len(parts) == 2 and not parts[1].isdigit()):
                raise AlproError(f"{path}:{n}: expected 'word count', got {line.strip()!r}")
            out.append((parts[0], int(parts[1]) if len(parts) == 2 else 0))
    return out


def read_entities(path: str | Path, limit: int | None = None) -> list[str]:
    """The entity names of an entity file (first field of each line), at most ``limit`` of them."""
    names = [word for word, _ in read_unigrams(path)]
    if not names:
        raise AlproError(f"{path}: no entities")
    return names[:limit] if limit else names


# ------------------------------------------------------------------------------------------------------ counting


def count_nouns(captions: Iterable[str], tagger=heuristic_nouns) -> Counter[str]:
    counts: Counter[str] = Counter()
    for caption in captions:
        counts.update(tagger(caption))
    return counts


def write_unigrams(counts: Iterable[tuple[str, int]], path: Path) -> None:
    """Write ``word count`` lines atomically."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, "".join(f"{w} {c}\n" for w, c in counts))


@dataclass
class EntitiesOptions:
    """The options of ``alpro entities`` (parsed by :func:`alpro.config.parse_command`; help from these docstrings)."""

    out: Path = option(positional=False)
    """output file (unigrams.txt format)"""
    shards: list[str] = field(default_factory=list)
    """shard set: directory, index, tar, glob or brace pattern (repeatable)"""
    manifest: list[Path] = field(default_factory=list)
    """manifest (any format alpro shard reads) (repeatable)"""
    text: list[Path] = field(default_factory=list)
    """plain text, one caption per line (repeatable)"""
    entities: Path | None = None
    """use this 'word count' list instead of counting captions"""
    top: int = 1000
    """keep the most frequent N"""
    min_count: int = 1
    """drop nouns seen fewer times"""
    tagger: Literal["auto", "spacy", "heuristic"] = "auto"
    """auto = spaCy when an English pipeline is installed, else the heuristic"""
    spacy_model: str | None = None
    """spaCy pipeline name (default: the first en_core_web_* installed)"""


def main(argv: list[str] | None = None) -> int:
    args = parse_command(EntitiesOptions, argv, prog="alpro entities",
                         description=__doc__.split("\n\n")[0])
    if args.top < 1:
        raise AlproError("--top must be >= 1")

    if args.entities is not None:
        if args.shards or args.manifest or args.text:
            raise AlproError("--entities replaces the caption sources: give one or the other")
        ranked = read_unigrams(args.entities)[: args.top]
        if not ranked:
            raise AlproError(f"{args.entities}: no entities")
        write_unigrams(ranked, args.out)
        print(f"wrote {len(ranked)} entities from {args.entities} to {args.out}")
        return 0

    if not (args.shards or args.manifest or args.text):
        raise AlproError("give captions with --shards, --manifest or --text (or a list with --entities)")
    tagger, tagger_name = heuristic_nouns, "heuristic"
    if args.tagger != "heuristic":
        spacy_fn = spacy_tagger(args.spacy_model)
        if spacy_fn is not None:
            tagger, tagger_name = spacy_fn, "spacy"
        elif args.tagger == "spacy":
            raise AlproError("--tagger spacy: no spaCy English pipeline is installed (e.g. en_core_web_sm)")

    def captions() -> Iterator[str]:
        for pattern in args.shards:
            yield from captions_from_shards(pattern)
        for path in args.manifest:
            yield from captions_from_manifest(path)
        for path in args.text:
            yield from captions_from_text(path)

    n_captions = 0

    def counted() -> Iterator[str]:
        nonlocal n_captions
        for caption in captions():
            n_captions += 1
            yield caption

    counts = count_nouns(counted(), tagger)
    ranked = sorted(((w, c) for w, c in counts.items() if c >= args.min_count), key=lambda wc: (-wc[1], wc[0]))
    ranked = ranked[: args.top]
    if not ranked:
        raise AlproError(f"no nouns found in {n_captions} captions")
    write_unigrams(ranked, args.out)
    short = f" (fewer than --top {args.top})" if len(ranked) < args.top else ""
    print(f"wrote {len(ranked)} entities{short} from {n_captions} captions ({tagger_name} tagger) to {args.out}")
    return 0


if __name__ == "__main__":
    from alpro.cli import guarded

    raise SystemExit(guarded("entities", main))
