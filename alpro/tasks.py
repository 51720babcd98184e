"""The task vocabulary and the PEM prompt templates: facts the model, the loader and the trainer share.

A leaf module (no imports from ``alpro``), so ``alpro.models``, ``alpro.data`` and ``alpro.train`` can all
read it without depending on each other: the model never imports the data package, yet both must agree on
what "prompter" means and on the exact template strings (the tokenizer is built from the templates' words; the
prompter embeds the same strings).
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = ["Task", "TASKS", "VIDEO_TEMPLATES", "IMAGE_TEMPLATES"]

Task = Literal["prompter", "pretrain", "retrieval", "qa"]
"""A training stage is its task: the stage-1 prompter (VTC only), pre-training (VTC + VTM + MLM + PEM), and the two
fine-tunings. The model's heads, the loader's sources and transforms, and the trainer's metrics follow from it."""
TASKS: tuple[str, ...] = get_args(Task)

# Paper Table 8 (the original's get_video_prompt_templates / get_image_prompt_templates), in its order: 12 per
# modality. The order matters: the prompter averages template-major embeddings (parity-checked).
VIDEO_TEMPLATES: tuple[str, ...] = (
    "A footage of a {}.", "A footage of the {}.", "A footage of one {}.",
    "A video of a {}.", "A video of the {}.", "A video of one {}.",
    "A portrait of a {}.", "A portrait of the {}.", "A portrait of one {}.",
    "A video footage of a {}.", "A video footage of the {}.", "A video footage of one {}.",
)
IMAGE_TEMPLATES: tuple[str, ...] = (
    "A photo of a {}.", "A photo of the {}.", "A photo of one {}.",
    "A picture of a {}.", "A picture of the {}.", "A picture of one {}.",
    "A good photo of the {}.", "A good photo of a {}.", "A good photo of one {}.",
    "A good picture of the {}.", "A good picture of a {}.", "A good picture of one {}.",
)
