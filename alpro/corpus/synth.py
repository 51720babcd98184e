"""The embedded default corpus: a seeded "shapes world" of captioned H.264 clips, still images and QA pairs.

Why synthetic: the demo and CI must pre-train, fine-tune and evaluate ALPRO end to end with no download, on two CPU
cores, in minutes. A real corpus cannot be shipped and is not learnable by a tiny model at 32-64 px; this one is
both, and it is still compositional: captions name shape x color x size x motion for 1-3 objects on a named
textured background, clips in one split never share an attribute signature, and about half of them are a
one-attribute edit of another clip of the same split, so text->video R@1 measures attribute binding, not luck.

Layout of OUT_DIR (``docs/corpus.md`` has the details)::

    videos/clip_000000.mp4   # H.264 (libx264 defaults: long GOP, B-frames), yuv420p, constant fps
    images/img_000000.jpg    # static scenes of the same world (the image stream of pre-training)
    manifest.jsonl           # one JSON object per clip / image: captions, split, qa, objects, background
    entities.txt             # corpus nouns as "word count", most frequent first (ALPRO's unigrams.txt format)
    corpus.json              # seed, options, counts per split, attribute vocabularies, answer vocabularies

Everything is a pure function of (seed, options): the scene plan is drawn from one generator seeded by ``seed``,
each clip and image is rendered from a generator seeded by ``(seed, stream, index)``, and x264 runs on one thread,
so the bytes are the same whatever ``workers`` is.
"""

from __future__ import annotations

import functools
import json
import math
import multiprocessing
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw
from tqdm import tqdm

from alpro.config import parse_command
from alpro.errors import AlproError
from alpro.fileio import atomic_path, atomic_write

# ----------------------------------------------------------------------------------------------------------------
# The world: attribute vocabularies
# ----------------------------------------------------------------------------------------------------------------

SHAPES = ("circle", "square", "triangle", "star", "cross", "heart")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 185, 50),
    "blue": (35, 70, 235),
    "yellow": (245, 215, 25),
    "purple": (145, 45, 195),
    "orange": (250, 130, 15),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
# Object extent as a fraction of the frame's short side. "small" stays >= ~5 px when a 120 px frame is shrunk to
# 32 px; "big" is 1.67x that, a difference that survives the same downscale.
SIZES: dict[str, float] = {"small": 0.18, "big": 0.30}
MOTIONS = (
    "moves left", "moves right", "moves up", "moves down", "spins", "bounces", "grows", "shrinks", "stays still",
)
DIRECTIONS = {"moves left": "left", "moves right": "right", "moves up": "up", "moves down": "down"}
# The colors each texture is drawn with; an object color must differ from all of them (see _MIN_CONTRAST).
BACKGROUNDS: dict[str, tuple[tuple[int, int, int], ...]] = {
    "grass": ((55, 105, 40), (95, 150, 60)),
    "bricks": ((165, 65, 50), (205, 195, 185)),
    "water": ((30, 80, 140), (70, 130, 185)),
    "sand": ((200, 175, 125), (225, 200, 150)),
    "sky": ((120, 170, 225), (235, 240, 248)),
    "snow": ((215, 222, 235), (250, 250, 252)),
    "checkerboard": ((105, 105, 105), (165, 165, 165)),
    "stripes": ((55, 125, 125), (105, 170, 170)),
}
COUNT_WORDS = ("one", "two", "three")
MAX_OBJECTS = len(COUNT_WORDS)
ANSWER_TYPES = ("color", "shape", "count", "direction", "background")
# Min RGB distance between an object color and every color of its background texture: below it (green on grass,
# red on bricks, blue on water, white on sky or snow) an object would vanish when the clip is shrunk to 32 px.
_MIN_CONTRAST = 90.0
# A rotation by the symmetry angle looks like no rotation at all: a spin turns 2 symmetry angles per clip, so any
# 4 evenly spaced frames are half a symmetry apart (the circle has no visible spin and never spins).
_SYMMETRY_DEG = {"square": 90.0, "triangle": 120.0, "star": 72.0, "cross": 90.0, "heart": 180.0}
_SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
# Share of scenes drawn as a one-attribute edit of an earlier scene of the same split (see plan_scenes).
_SIBLING_PROB = 0.5
_MIN_SECONDS, _MAX_SECONDS = 2.0, 8.0


@dataclass(frozen=True, order=True)
class SceneObject:
    shape: str
    color: str
    size: str
    motion: str | None = None  # None in still images

    def to_json(self) -> dict[str, str]:
        fields = {"shape": self.shape, "color": self.color, "size": self.size}
        return fields if self.motion is None else {**fields, "motion": self.motion}


@dataclass(frozen=True)
class Scene:
    """What a clip or image shows; ``objects`` are in caption order (the first caption lists them so)."""

    background: str
    objects: tuple[SceneObject, ...]

    def signature(self) -> tuple:
        """Order-free identity: scenes with equal signatures are described by the same words."""
        return (self.background, tuple(sorted(self.objects)))


@functools.cache
def allowed_colors(background: str) -> tuple[str, ...]:
    """Object colors that stay visible on ``background``."""
    palette = np.array(BACKGROUNDS[background], dtype=float)
    return tuple(
        name for name, rgb in COLORS.items() if np.linalg.norm(palette - np.array(rgb), axis=1).min() >= _MIN_CONTRAST
    )


@functools.cache
def allowed_motions(shape: str) -> tuple[str, ...]:
    return tuple(m for m in MOTIONS if not (m == "spins" and shape not in _SYMMETRY_DEG))


def is_valid_scene(scene: Scene, video: bool) -> bool:
    """1-3 objects with distinct shapes and colors (so "the circle" and "the red object" name one object), colors
    visible on the background, motions only in clips and only those the shape can show."""
    objs = scene.objects
    ok_colors = allowed_colors(scene.background)
    return (
        1 <= len(objs) <= MAX_OBJECTS
        and len({o.shape for o in objs}) == len(objs)
        and len({o.color for o in objs}) == len(objs)
        and all(o.color in ok_colors for o in objs)
        and all((o.motion in allowed_motions(o.shape)) if video else o.motion is None for o in objs)
    )


# ----------------------------------------------------------------------------------------------------------------
# Planning: splits and scenes (one generator, so the plan does not depend on the number of workers)
# ----------------------------------------------------------------------------------------------------------------


def assign_splits(n: int, rng: np.random.Generator) -> list[str]:
    """80/10/10 train/val/test at random positions; val and test get round(10%) each, train the rest."""
    n_val, n_test = (math.floor(n * frac + 0.5) for _, frac in _SPLITS[1:])
    labels = ["val"] * n_val + ["test"] * n_test + ["train"] * (n - n_val - n_test)
    return [labels[i] for i in rng.permutation(n)]


def _random_object(rng: np.random.Generator, shape: str, color: str, video: bool) -> SceneObject:
    size = str(rng.choice(list(SIZES)))
    motion = str(rng.choice(allowed_motions(shape))) if video else None
    return SceneObject(shape, color, size, motion)


def fresh_scene(rng: np.random.Generator, video: bool) -> Scene:
    background = str(rng.choice(list(BACKGROUNDS)))
    n = int(rng.integers(1, MAX_OBJECTS + 1))
    shapes = rng.choice(SHAPES, n, replace=False)
    colors = rng.choice(allowed_colors(background), n, replace=False)
    return Scene(background, tuple(_random_object(rng, str(s), str(c), video) for s, c in zip(shapes, colors)))


def mutate_scene(rng: np.random.Generator, scene: Scene, video: bool) -> Scene:
    """Change exactly one attribute (or add / remove one object); the result may be invalid, callers check."""
    objs = list(scene.objects)
    edits = ["color", "shape", "size", "background"] + ["motion"] * video
    edits += ["add"] * (len(objs) < MAX_OBJECTS) + ["remove"] * (len(objs) > 1)
    edit = str(rng.choice(edits))
    i = int(rng.integers(len(objs)))
    if edit == "background":
        return replace(scene, background=str(rng.choice([b for b in BACKGROUNDS if b != scene.background])))
    if edit == "add":
        shape = str(rng.choice([s for s in SHAPES if s not in {o.shape for o in objs}]))
        color = str(rng.choice([c for c in COLORS if c not in {o.color for o in objs}]))
        objs.insert(int(rng.integers(len(objs) + 1)), _random_object(rng, shape, color, video))
    elif edit == "remove":
        objs.pop(i)
    else:
        vocab = {"color": list(COLORS), "shape": list(SHAPES), "size": list(SIZES), "motion": list(MOTIONS)}[edit]
        current = getattr(objs[i], edit)
        objs[i] = replace(objs[i], **{edit: str(rng.choice([v for v in vocab if v != current]))})
    return replace(scene, objects=tuple(objs))


def plan_scenes(splits: Sequence[str], rng: np.random.Generator, video: bool) -> list[Scene]:
    """One scene per split label, all signatures distinct (across splits too, so no test clip repeats a train clip).

    With probability 1/2 a scene is a one-attribute edit of an earlier scene of the same split, so a test clip's
    nearest neighbour often differs from it by a single word and retrieval has to bind attributes to objects.
    """
    taken = set()
    by_split: dict[str, list[Scene]] = {}
    scenes = []
    for split in splits:
        pool = by_split.setdefault(split, [])
        for _ in range(1000):
            if pool and rng.random() < _SIBLING_PROB:
                scene = mutate_scene(rng, pool[int(rng.integers(len(pool)))], video)
            else:
                scene = fresh_scene(rng, video)
            if is_valid_scene(scene, video) and scene.signature() not in taken:
                break
        else:
            raise AlproError(f"cannot draw {len(splits)} distinct scenes: the shapes world is too small for that many")
        taken.add(scene.signature())
        pool.append(scene)
        scenes.append(scene)
    return scenes


# ----------------------------------------------------------------------------------------------------------------
# Language: captions (3-5 paraphrases per item) and single-word QA
# ----------------------------------------------------------------------------------------------------------------

# Canonical phrase first (used by the first caption); paraphrases draw from all of them.
_VERBS = {
    "moves left": ("moves left", "moves to the left", "slides left", "goes left"),
    "moves right": ("moves right", "moves to the right", "slides right", "goes right"),
    "moves up": ("moves up", "rises", "goes up", "floats up"),
    "moves down": ("moves down", "falls", "goes down", "sinks"),
    "spins": ("spins", "rotates", "turns around", "is spinning"),
    "bounces": ("bounces", "bounces up and down", "is bouncing", "hops"),
    "grows": ("grows", "gets bigger", "expands", "is growing"),
    "shrinks": ("shrinks", "gets smaller", "contracts", "is shrinking"),
    "stays still": ("stays still", "does not move", "is still", "rests"),
}
_GERUNDS = {
    "moves left": ("moving left", "sliding to the left"),
    "moves right": ("moving right", "sliding to the right"),
    "moves up": ("moving up", "rising"),
    "moves down": ("moving down", "falling"),
    "spins": ("spinning", "rotating"),
    "bounces": ("bouncing", "hopping"),
    "grows": ("growing", "getting bigger"),
    "shrinks": ("shrinking", "getting smaller"),
    "stays still": ("standing still", "resting"),
}
# Nouns that captions use besides shape and background names; entities.txt counts all of them.
_CAPTION_NOUNS = ("background", "object", "objects", "video", "picture", "image")


def _join(parts: Sequence[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def _noun_phrase(o: SceneObject) -> str:
    return f"a {o.size} {o.color} {o.shape}"


def _counted(n: int) -> str:
    return f"{COUNT_WORDS[n - 1]} object" + ("s" if n > 1 else "")


def clip_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """3-5 captions: the canonical one first, then paraphrases with other templates, word orders and verbs."""
    bg, objs = scene.background, scene.objects

    def clauses(order: Sequence[SceneObject]) -> list[str]:
        return [f"{_noun_phrase(o)} {rng.choice(_VERBS[o.motion])}" for o in order]

    def gerunds(order: Sequence[SceneObject]) -> list[str]:
        return [f"{_noun_phrase(o)} {rng.choice(_GERUNDS[o.motion])}" for o in order]

    def while_clause(order: Sequence[SceneObject]) -> str:
        c = clauses(order)
        return c[0] if len(c) == 1 else f"{c[0]} while {_join(c[1:])}"

    paraphrases: list[Callable[[Sequence[SceneObject]], str]] = [
        lambda o: f"on a {bg} background, {_join(clauses(o))}",
        lambda o: f"{bg} background with {_join(gerunds(o))}",
        lambda o: f"{_counted(len(o))} against a {bg} background: {_join(clauses(o))}",
        lambda o: f"{while_clause(o)}, over a {bg} background",
        lambda o: f"a video of {_join(gerunds(o))} on a {bg} background",
        lambda o: f"the background is {bg} and {_join(clauses(o))}",
    ]
    canonical = _join([f"{_noun_phrase(o)} {o.motion}" for o in objs]) + f" on a {bg} background"
    return [canonical] + _paraphrase(paraphrases, objs, rng)


def image_captions(scene: Scene, rng: np.random.Generator) -> list[str]:
    """Like :func:`clip_captions` with no motion words: the objects of a still image do not move."""
    bg, objs = scene.background, scene.objects

    def nps(order: Sequence[SceneObject]) -> str:
        return _join([_noun_phrase(o) for o in order])

    paraphrases: list[Callable[[Sequence[SceneObject]], str]] = [
        lambda o: f"a picture of {nps(o)} against a {bg} background",
        lambda o: f"{bg} background with {nps(o)}",
        lambda o: f"{_counted(len(o))} on a {bg} background: {nps(o)}",
        lambda o: f"an image of {nps(o)} over a {bg} background",
    ]
    return [f"{nps(objs)} on a {bg} background"] + _paraphrase(paraphrases, objs, rng)


def _paraphrase(templates: list, objs: Sequence[SceneObject], rng: np.random.Generator) -> list[str]:
    n = int(rng.integers(2, 5))  # 2-4 paraphrases after the canonical caption: 3-5 captions per item
    picks = rng.choice(len(templates), n, replace=False)
    return [templates[int(k)]([objs[int(j)] for j in rng.permutation(len(objs))]) for k in picks]


def clip_questions(scene: Scene, rng: np.random.Generator, max_questions: int = 6) -> list[dict[str, str]]:
    """Up to ``max_questions`` unambiguous questions with one-word answers, spread over the answer types.

    Each round takes one random candidate per answer type (types in random order), so count and background ask
    once per clip and no single answer dominates. Questions that could have two answers are never made: shape-by-
    motion only for a motion no other object has (and not "moves up/down" while something bounces).
    """
    objs = scene.objects
    motions = Counter(o.motion for o in objs)
    candidates: dict[str, list[tuple[str, str]]] = {t: [] for t in ANSWER_TYPES}
    for o in objs:
        q = rng.choice(["what color is the {s}?", "what is the color of the {s}?", "which color does the {s} have?"])
        candidates["color"].append((q.format(s=o.shape), o.color))
        q = rng.choice(["what shape is the {c} object?", "which shape is {c}?"])
        candidates["shape"].append((q.format(c=o.color), o.shape))
        vertical_clash = o.motion in ("moves up", "moves down") and "bounces" in motions
        if motions[o.motion] == 1 and not vertical_clash:
            q = rng.choice(["which shape {m}?", "what is the shape of the object that {m}?"])
            candidates["shape"].append((q.format(m=o.motion), o.shape))
        if o.motion in DIRECTIONS:
            q = rng.choice(["which direction does the {c} {s} move?", "in which direction is the {s} moving?",
                            "where does the {c} object go?"])
            candidates["direction"].append((q.format(c=o.color, s=o.shape), DIRECTIONS[o.motion]))
    q = rng.choice(["how many objects are there?", "how many shapes are in the video?", "how many objects are shown?"])
    candidates["count"].append((q, COUNT_WORDS[len(objs) - 1]))
    q = rng.choice(["what is the background?", "what is behind the objects?", "what background is shown?"])
    candidates["background"].append((q, scene.background))

    pools = {t: [c[int(i)] for i in rng.permutation(len(c))] for t, c in candidates.items()}
    qa: list[dict[str, str]] = []
    while len(qa) < max_questions and any(pools.values()):
        for t in rng.permutation(ANSWER_TYPES):
            if pools[t] and len(qa) < max_questions:
                question, answer = pools[t].pop()
                qa.append({"question": question, "answer": answer, "answer_type": str(t)})
    return qa


# ----------------------------------------------------------------------------------------------------------------
# Rendering: textures, shapes, motion paths
# ----------------------------------------------------------------------------------------------------------------


def _two_tone(palette: tuple, weight: np.ndarray) -> np.ndarray:
    """Blend the two palette colors by ``weight`` in [0, 1] (H, W) -> (H, W, 3) uint8."""
    a, b = (np.array(c, dtype=np.float32) for c in palette)
    return (a + (b - a) * np.clip(weight, 0, 1)[..., None]).round().astype(np.uint8)


def texture(background: str, rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """A (height, width, 3) uint8 texture; pattern scales follow the frame height, so the pattern survives the
    same downscale at any source size, and each clip gets its own phase and noise."""
    palette = BACKGROUNDS[background]
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    u = height / 120.0  # pattern unit: 1 px of the 160x120 design size
    phase = rng.uniform(0, 2 * np.pi)
    noise = rng.normal(0, 1, (height, width)).astype(np.float32)
    if background == "grass":  # vertical blades: noise stretched along y
        blades = np.repeat(rng.normal(0, 1, (height // max(1, round(6 * u)) + 1, width)), max(1, round(6 * u)), 0)
        w = 0.5 + 0.25 * blades[:height] + 0.1 * noise
    elif background == "bricks":  # staggered bricks with light mortar joints
        bh = 15 * u
        row = np.floor(y / bh)
        bx = (x + (row % 2) * 15 * u + phase * 10 * u) % (30 * u)
        w = ((y % bh < 2 * u) | (bx < 2 * u)).astype(np.float32) + 0.05 * noise
    elif background == "water":  # wavy horizontal bands
        w = 0.5 + 0.45 * np.sin(2 * np.pi * y / (12 * u) + 1.5 * np.sin(2 * np.pi * x / (45 * u) + phase))
    elif background == "sand":  # fine grain with soft dunes
        w = 0.5 + 0.3 * np.sin(2 * np.pi * (x + 0.5 * y) / (70 * u) + phase) + 0.2 * noise
    elif background == "sky":  # gradient with a few soft clouds
        w = 0.15 * y / height
        for cx, cy, r in rng.uniform([0, 0, 12 * u], [width, 0.6 * height, 24 * u], (3, 3)):
            w = w + np.exp(-(((x - cx) / (1.8 * r)) ** 2 + ((y - cy) / r) ** 2))
    elif background == "snow":  # bright with scattered flakes
        w = 0.3 + 0.1 * noise + (rng.random((height, width)) < 0.04)
    elif background == "checkerboard":
        cell = 20 * u
        w = ((np.floor((x + phase * cell) / cell) + np.floor(y / cell)) % 2).astype(np.float32)
    elif background == "stripes":  # diagonal bands
        w = (((x + y) / (16 * u) + phase) % 2 < 1).astype(np.float32) + 0.05 * noise
    else:
        raise AlproError(f"unknown background {background!r}; known: {', '.join(BACKGROUNDS)}")
    return _two_tone(palette, w)


def _unit_outline(shape: str) -> np.ndarray:
    """(K, 2) polygon of ``shape`` centred at 0 with extent ~1 (image axes: y down)."""
    if shape == "square":
        return np.array([[-0.43, -0.43], [0.43, -0.43], [0.43, 0.43], [-0.43, 0.43]])
    if shape == "triangle":
        a = np.deg2rad(-90 + 120 * np.arange(3))
        return 0.62 * np.stack([np.cos(a), np.sin(a)], 1) + [0, 0.12]
    if shape == "star":
        a = np.deg2rad(-90 + 36 * np.arange(10))
        r = np.where(np.arange(10) % 2 == 0, 0.55, 0.23)
        return np.stack([r * np.cos(a), r * np.sin(a)], 1) + [0, 0.04]
    if shape == "cross":
        a, b = 0.5, 0.17
        return np.array([[-b, -a], [b, -a], [b, -b], [a, -b], [a, b], [b, b], [b, a], [-b, a], [-b, b], [-a, b],
                         [-a, -b], [-b, -b]])
    if shape == "heart":
        t = np.linspace(0, 2 * np.pi, 40, endpoint=False)
        hx = 16 * np.sin(t) ** 3
        hy = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
        return np.stack([hx, hy + 2.5], 1) / 33.0
    raise AlproError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")


_OUTLINES = {s: _unit_outline(s) for s in SHAPES if s != "circle"}


def draw_object(draw: ImageDraw.ImageDraw, shape: str, rgb: tuple, x: float, y: float, extent: float,
                angle_deg: float) -> None:
    if shape == "circle":
        r = extent / 2
        draw.ellipse([x - r, y - r, x + r, y + r], fill=rgb)
        return
    a = np.deg2rad(angle_deg)
    rot = np.array([[np.cos(a), -np.sin(a)], [np.sin(a), np.cos(a)]])
    points = _OUTLINES[shape] @ rot.T * extent + [x, y]  # (K, 2)
    draw.polygon([tuple(p) for p in points.tolist()], fill=rgb)


@dataclass(frozen=True)
class Path2D:
    """Pose of one object over normalised clip time t in [0, 1]: linear in position, extent and angle, plus an
    optional bounce (|sin| hops) on y."""

    start: tuple[float, float]
    end: tuple[float, float]
    extent: tuple[float, float]
    angle: tuple[float, float]
    hop_height: float = 0.0
    hops: float = 0.0

    def at(self, t: float) -> tuple[float, float, float, float]:
        """(x, y, extent, angle_deg) at time t."""
        x, y, extent, angle = (a + (b - a) * t for a, b in (*zip(self.start, self.end), self.extent, self.angle))
        return x, y - self.hop_height * abs(math.sin(math.pi * self.hops * t)), extent, angle


def plan_paths(scene: Scene, rng: np.random.Generator, width: int, height: int) -> list[Path2D]:
    """One path per object, in scene order.

    Object i owns row lane i and column lane perm[i] of an n x n grid: horizontal movers travel along their row,
    vertical movers and bouncers along their column, the others stay at (column, row). So a mover never runs over
    an object that stays in place; only two movers can cross. Movers cross 75-100% of the free range, a good part
    of the frame between any 4 sparse frames.
    """
    n = len(scene.objects)
    perm = rng.permutation(n)
    short = min(width, height)
    paths = []
    for i, o in enumerate(scene.objects):
        extent = SIZES[o.size] * short * rng.uniform(0.92, 1.08)
        grow = {"grows": (0.65, 1.35), "shrinks": (1.35, 0.65)}.get(o.motion or "", (1.0, 1.0))
        margin = 0.5 * extent * max(grow) + 2

        x, y = ((k + 0.5 + rng.uniform(-0.08, 0.08)) * side / n for k, side in ((perm[i], width), (i, height)))
        x, y = float(np.clip(x, margin, width - margin)), float(np.clip(y, margin, height - margin))
        angle = float(rng.uniform(-8, 8))
        start, end, spin, hop = (x, y), (x, y), 0.0, (0.0, 0.0)
        if o.motion in DIRECTIONS:
            horizontal = o.motion in ("moves left", "moves right")
            side = width if horizontal else height
            travel = rng.uniform(0.75, 1.0) * (side - 2 * margin)
            first = rng.uniform(margin, side - margin - travel)
            a, b = (first + travel, first) if o.motion in ("moves left", "moves up") else (first, first + travel)
            start, end = ((a, y), (b, y)) if horizontal else ((x, a), (x, b))
        elif o.motion == "bounces":  # hops from the floor; 1.3-1.7 hops so 4 sparse frames catch different heights
            floor = height - margin
            start = end = (x, floor)
            hop = (rng.uniform(0.7, 0.95) * (floor - margin), rng.uniform(1.3, 1.7))
        elif o.motion == "spins":
            spin = float(rng.choice([-1, 1]) * 2 * _SYMMETRY_DEG[o.shape] * rng.uniform(0.85, 1.15))
        paths.append(Path2D(start, end, (extent * grow[0], extent * grow[1]), (angle, angle + spin), *hop))
    return paths


def render_frames(scene: Scene, rng: np.random.Generator, width: int, height: int, num_frames: int):
    """Yield ``num_frames`` PIL RGB frames of ``scene`` (movers drawn last, so they pass in front)."""
    background = Image.fromarray(texture(scene.background, rng, width, height))
    paths = plan_paths(scene, rng, width, height)
    order = sorted(range(len(paths)), key=lambda k: scene.objects[k].motion in (*DIRECTIONS, "bounces"))
    for f in range(num_frames):
        t = f / max(1, num_frames - 1)
        frame = background.copy()
        draw = ImageDraw.Draw(frame)
        for k in order:
            o = scene.objects[k]
            draw_object(draw, o.shape, COLORS[o.color], *paths[k].at(t))
        yield frame


def render_clip(scene: Scene, path: str | os.PathLike, *, seed: Sequence[int], num_frames: int, fps: int = 24,
                size: tuple[int, int] = (160, 120)) -> None:
    """Write ``scene`` as an H.264 mp4 (libx264, yuv420p, constant ``fps``), byte-reproducible from ``seed``.

    The file appears under its final name only when complete (:func:`alpro.fileio.atomic_path`).
    """
    width, height = size
    rng = np.random.default_rng(list(seed))
    with atomic_path(path) as tmp, av.open(str(tmp), "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.thread_count = 1  # parallelism is per clip
        # veryfast keeps what makes a source realistic (B-frames, one keyframe per clip) and encodes 2.1x faster than
        # the default medium (4500 vs 2100 fps at 160x120 on one core) with 12% smaller files. MB-tree is off
        # because it is not reproducible even on one thread: with it, re-encoding the same frames gave different
        # bytes for ~3 in 10 scenes (x264 in av 18.1); without it, 40 of 40 scenes x 6 runs were identical.
        stream.options = {"preset": "veryfast", "x264-params": "no-mbtree=1"}
        for frame in render_frames(scene, rng, width, height, num_frames):
            container.mux(stream.encode(av.VideoFrame.from_image(frame)))
        container.mux(stream.encode())


def render_image(scene: Scene, path: str | os.PathLike, *, seed: Sequence[int], size: tuple[int, int] = (160, 120),
                 quality: int = 90) -> None:
    """Write a still ``scene`` (objects without motion) as a JPEG, byte-reproducible from ``seed``."""
    width, height = size
    rng = np.random.default_rng(list(seed))
    (frame,) = render_frames(scene, rng, width, height, 1)
    with atomic_path(path) as tmp:
        frame.save(tmp, format="JPEG", quality=quality)


# ----------------------------------------------------------------------------------------------------------------
# The corpus
# ----------------------------------------------------------------------------------------------------------------

_CLIP_STREAM, _IMAGE_STREAM, _TEXT_STREAM = 1, 2, 3
_OUTPUTS = ("manifest.jsonl", "entities.txt", "corpus.json")


@dataclass(frozen=True)
class _Job:
    """What a worker needs to render one item; everything else stays in the parent."""

    kind: str  # "clip" | "image"
    path: str
    scene: Scene
    seed: tuple[int, ...]
    num_frames: int
    fps: int
    size: tuple[int, int]


def _run_job(job: _Job) -> None:
    if job.kind == "clip":
        render_clip(job.scene, job.path, seed=job.seed, num_frames=job.num_frames, fps=job.fps, size=job.size)
    else:
        render_image(job.scene, job.path, seed=job.seed, size=job.size)


def _prepare_out_dir(out_dir: Path, overwrite: bool) -> None:
    """Create OUT_DIR; refuse a non-empty one unless ``overwrite``, which then removes only what synth writes."""
    if out_dir.exists() and not out_dir.is_dir():
        raise AlproError(f"{out_dir} exists and is not a directory")
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        existing = list(out_dir.iterdir())
        if existing and not overwrite:
            raise AlproError(f"{out_dir} is not empty ({len(existing)} entries); pass --overwrite to replace the corpus")
        for sub, pattern in (("videos", "clip_*.mp4"), ("images", "img_*.jpg")):
            for f in [*(out_dir / sub).glob(pattern), *(out_dir / sub).glob(f".{pattern}.*.tmp")]:
                f.unlink()
        for name in _OUTPUTS:
            (out_dir / name).unlink(missing_ok=True)
        (out_dir / "videos").mkdir(exist_ok=True)
        (out_dir / "images").mkdir(exist_ok=True)
        probe = out_dir / ".synth-write-test"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise AlproError(f"cannot write to {out_dir}: {e.strerror or e}") from None


def entity_counts(captions: Sequence[str]) -> list[tuple[str, int]]:
    """Corpus nouns (shapes, backgrounds and the other caption nouns) by count, most frequent first."""
    nouns = set(SHAPES) | set(BACKGROUNDS) | set(_CAPTION_NOUNS)
    counts = Counter(w for c in captions for w in re.findall(r"[a-z]+", c.lower()) if w in nouns)
    return sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` -> (W, H); even numbers (yuv420p halves chroma), 64-1920 by 48-1080."""
    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", text)
    if not m:
        raise AlproError(f"--size {text!r}: expected WIDTHxHEIGHT, e.g. 160x120")
    w, h = int(m[1]), int(m[2])
    if w % 2 or h % 2 or not (64 <= w <= 1920 and 48 <= h <= 1080):
        raise AlproError(f"--size {text!r}: width and height must be even, width 64-1920 and height 48-1080")
    return w, h


def generate(out_dir: str | os.PathLike, *, num_clips: int = 2000, num_images: int | None = None, seed: int = 0,
             fps: int = 24, size: tuple[int, int] = (160, 120), workers: int = 2, overwrite: bool = False,
             progress: bool = True) -> dict:
    """Write the shapes-world corpus to ``out_dir`` and return its ``corpus.json`` content.

    ``num_images`` defaults to ``num_clips // 2``. The output is a pure function of the arguments other than
    ``workers``, ``overwrite`` and ``progress``.
    """
    num_images = num_clips // 2 if num_images is None else num_images
    for name, value, low in (("--num-clips", num_clips, 0), ("--num-images", num_images, 0), ("--workers", workers, 1),
                             ("--fps", fps, 1), ("--seed", seed, 0)):
        if not isinstance(value, int) or value < low:
            raise AlproError(f"{name} must be an integer >= {low}, got {value!r}")
    if fps > 120:
        raise AlproError(f"--fps must be at most 120, got {fps}")
    if num_clips + num_images == 0:
        raise AlproError("nothing to generate: --num-clips and --num-images are both 0")
    parse_size(f"{size[0]}x{size[1]}")
    out = Path(out_dir)
    _prepare_out_dir(out, overwrite)
    started = time.perf_counter()

    # The plan: splits and scenes from one generator; per-item text and durations from per-index generators.
    plan_rng = np.random.default_rng([seed, 0])
    clip_splits, image_splits = assign_splits(num_clips, plan_rng), assign_splits(num_images, plan_rng)
    clip_scenes = plan_scenes(clip_splits, plan_rng, video=True)
    image_scenes = plan_scenes(image_splits, plan_rng, video=False)
    records, jobs = [], []
    for i, (split, scene) in enumerate(zip(clip_splits, clip_scenes)):
        rng = np.random.default_rng([seed, _TEXT_STREAM, 0, i])
        # 2-8 s, skewed short (mean 3.5 s, median 2.75 s): the demo transcodes every clip once, and the 4 sparse
        # frames a model sees are just as informative in a short clip.
        num_frames = round(fps * (_MIN_SECONDS + (_MAX_SECONDS - _MIN_SECONDS) * rng.random() ** 3))
        cid = f"clip_{i:06d}"
        records.append({
            "id": cid, "video": f"videos/{cid}.mp4", "captions": clip_captions(scene, rng), "split": split,
            "qa": clip_questions(scene, rng), "objects": [o.to_json() for o in scene.objects],
            "background": scene.background, "duration": round(num_frames / fps, 6),
            "num_frames": num_frames, "fps": fps,
        })
        jobs.append(_Job("clip", str(out / records[-1]["video"]), scene, (seed, _CLIP_STREAM, i), num_frames, fps, size))
    for i, (split, scene) in enumerate(zip(image_splits, image_scenes)):
        rng = np.random.default_rng([seed, _TEXT_STREAM, 1, i])
        iid = f"img_{i:06d}"
        records.append({
            "id": iid, "image": f"images/{iid}.jpg", "captions": image_captions(scene, rng), "split": split,
            "objects": [o.to_json() for o in scene.objects], "background": scene.background,
        })
        jobs.append(_Job("image", str(out / records[-1]["image"]), scene, (seed, _IMAGE_STREAM, i), 1, fps, size))

    # Longest clips first keeps both workers busy to the end.
    jobs.sort(key=lambda j: -j.num_frames)
    with tqdm(total=len(jobs), desc="synth", unit="item", disable=not progress, dynamic_ncols=True) as bar:
        if workers == 1:
            for job in jobs:
                _run_job(job)
                bar.update()
        else:
            # spawn, not fork: callers (tests, the demo) may already run torch threads, which fork can deadlock.
            with multiprocessing.get_context("spawn").Pool(workers) as pool:
                for _ in pool.imap_unordered(_run_job, jobs, chunksize=4):
                    bar.update()

    corpus = _corpus_info(records, seed=seed, fps=fps, size=size, num_clips=num_clips, num_images=num_images)
    atomic_write(out / "manifest.jsonl", "".join(json.dumps(r) + "\n" for r in records))
    all_captions = [c for r in records for c in r["captions"]]
    atomic_write(out / "entities.txt", "".join(f"{w} {n}\n" for w, n in entity_counts(all_captions)))
    atomic_write(out / "corpus.json", json.dumps(corpus, indent=2) + "\n")
    corpus["seconds"] = round(time.perf_counter() - started, 1)
    return corpus


def _corpus_info(records: list[dict], *, seed: int, fps: int, size: tuple[int, int], num_clips: int,
                 num_images: int) -> dict:
    counts = {split: {"clips": 0, "images": 0, "questions": 0} for split, _ in _SPLITS}
    answers: dict[str, Counter] = {split: Counter() for split, _ in _SPLITS}
    for r in records:
        counts[r["split"]]["clips" if "video" in r else "images"] += 1
        counts[r["split"]]["questions"] += len(r.get("qa", ()))
        answers[r["split"]].update(qa["answer"] for qa in r.get("qa", ()))
    clips = [r for r in records if "video" in r]
    return {
        "format": "alpro-synth", "version": 1, "seed": seed,
        "options": {"num_clips": num_clips, "num_images": num_images, "fps": fps, "width": size[0], "height": size[1],
                    "codec": "h264", "min_seconds": _MIN_SECONDS, "max_seconds": _MAX_SECONDS},
        "counts": counts,
        "totals": {"clips": len(clips), "images": len(records) - len(clips),
                   "frames": sum(r["num_frames"] for r in clips), "seconds": round(sum(r["duration"] for r in clips), 3)},
        "vocab": {"shapes": list(SHAPES), "colors": list(COLORS), "sizes": list(SIZES), "motions": list(MOTIONS),
                  "backgrounds": list(BACKGROUNDS)},
        "answers": {"color": list(COLORS), "shape": list(SHAPES), "count": list(COUNT_WORDS),
                    "direction": list(DIRECTIONS.values()), "background": list(BACKGROUNDS)},
        "answer_counts": {split: dict(sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))) for split, c in answers.items()},
    }


@dataclass
class SynthOptions:
    """The options of ``alpro synth`` (parsed by :func:`alpro.config.parse_command`; help from these docstrings)."""

    out_dir: str
    """output directory (created; must be empty unless --overwrite)"""
    num_clips: int = 2000
    """number of video clips"""
    num_images: int | None = None
    """number of still images (default: num-clips // 2)"""
    seed: int = 0
    """corpus seed; same seed + options -> same bytes"""
    fps: int = 24
    """source frame rate"""
    size: str = "160x120"
    """frame size WIDTHxHEIGHT, even numbers"""
    workers: int = 2
    """render processes; does not change the output"""
    overwrite: bool = False
    """replace a corpus already in OUT_DIR"""
    quiet: bool = False
    """no progress bar"""


def main(argv: list[str] | None = None) -> int:
    args = parse_command(SynthOptions, argv, prog="alpro synth",
                         description="Generate the embedded 'shapes world' corpus: captioned H.264 clips, JPEG "
                                     "images, QA pairs.")
    info = generate(args.out_dir, num_clips=args.num_clips, num_images=args.num_images, seed=args.seed, fps=args.fps,
                    size=parse_size(args.size), workers=args.workers, overwrite=args.overwrite, progress=not args.quiet)
    splits = " / ".join(f"{s} {c['clips']}+{c['images']}" for s, c in info["counts"].items())
    print(f"alpro synth: {info['totals']['clips']} clips ({info['totals']['seconds'] / 60:.1f} min of video) and "
          f"{info['totals']['images']} images [{splits} clips+images] -> {args.out_dir} in {info['seconds']:.1f} s")
    return 0


if __name__ == "__main__":
    from alpro.cli import guarded

    raise SystemExit(guarded("synth", main))
