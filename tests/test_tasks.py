"""``alpro.tasks``: the task vocabulary and the 24 PEM templates have one definition, which the model, the loader
and the trainer all use."""

from __future__ import annotations

import typing
from pathlib import Path

import alpro.data as data
import alpro.models as models
from alpro import tasks
from alpro.train import config as train_config

ROOT = Path(__file__).resolve().parents[1]


def test_every_layer_uses_the_one_vocabulary():
    assert tasks.TASKS == ("prompter", "pretrain", "retrieval", "qa")
    assert data.TASKS is models.TASKS is tasks.TASKS
    hints = typing.get_type_hints(train_config.RunConfig)
    assert typing.get_args(hints["stage"]) == tasks.TASKS  # every stage is a task, and nothing else


def test_model_and_tokenizer_see_the_same_template_strings():
    assert data.VIDEO_PROMPT_TEMPLATES is models.VIDEO_TEMPLATES is tasks.VIDEO_TEMPLATES
    assert data.IMAGE_PROMPT_TEMPLATES is models.IMAGE_TEMPLATES is tasks.IMAGE_TEMPLATES
    for templates in (tasks.VIDEO_TEMPLATES, tasks.IMAGE_TEMPLATES):
        assert len(templates) == len(set(templates)) == 12
        assert all(t.count("{}") == 1 and t.endswith(" {}.") for t in templates)


def test_no_other_source_file_spells_a_template_or_the_vocabulary():
    """The regression this module exists for: a second copy that can drift."""
    owner = ROOT / "alpro" / "tasks.py"
    needles = ('"A footage of a {}."', '"A good picture of one {}."', '("prompter", "pretrain", "retrieval", "qa")',
               '("pretrain", "prompter", "retrieval", "qa")', 'Literal["prompter", "pretrain", "retrieval", "qa"]')
    for tree in ("alpro", "kernels", "sharding"):
        for path in (ROOT / tree).rglob("*.py"):
            if path == owner:
                continue
            text = path.read_text()
            assert not [n for n in needles if n in text], f"{path.relative_to(ROOT)} defines a task fact again"
