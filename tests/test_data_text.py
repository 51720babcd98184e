"""Tokenizer training / saving and the reference MLM masking statistics."""

from __future__ import annotations

import torch

from alpro.data import IMAGE_PROMPT_TEMPLATES, VIDEO_PROMPT_TEMPLATES, build_tokenizer
from alpro.data.text import encode, mask_tokens

CORPUS = ["a man rides a red bicycle down the street", "two dogs play with a ball in the park",
          "what color is the car", "a woman is cooking pasta in a kitchen", "children swim in a blue pool"] * 4


def test_templates_match_the_original():
    assert len(VIDEO_PROMPT_TEMPLATES) == len(IMAGE_PROMPT_TEMPLATES) == 12
    assert VIDEO_PROMPT_TEMPLATES[0] == "A footage of a {}."
    assert VIDEO_PROMPT_TEMPLATES[-1] == "A video footage of one {}."
    assert IMAGE_PROMPT_TEMPLATES[6] == "A good photo of the {}."
    assert IMAGE_PROMPT_TEMPLATES[-1] == "A good picture of one {}."


def test_trained_tokenizer_is_uncased_saved_and_covers_prompts(tmp_path):
    tok = build_tokenizer(train_texts=CORPUS, save_dir=tmp_path / "tok", vocab_size=300)
    assert tok.tokenize("A MAN Rides") == tok.tokenize("a man rides")
    for template in VIDEO_PROMPT_TEMPLATES + IMAGE_PROMPT_TEMPLATES:
        assert tok.unk_token_id not in tok(template.format("dog"))["input_ids"], template
    assert tok.unk_token_id not in tok("zebra xylophone")["input_ids"]  # unseen words fall back to characters
    again = build_tokenizer(save_dir=tmp_path / "tok")  # a resumed run loads, does not retrain
    assert again.get_vocab() == tok.get_vocab()
    ids, mask = encode(tok, ["a man rides", "x " * 100], max_len=12)
    assert ids.shape == (2, 12) and ids.dtype == torch.int64
    assert mask[0].tolist() == [1] * 5 + [0] * 7 and mask[1].sum() == 12  # padded, and truncated
    assert ids[0, 0] == tok.cls_token_id and ids[0, 4] == tok.sep_token_id and ids[0, 5] == tok.pad_token_id


def test_mlm_masking_statistics_match_the_reference_collator(tmp_path):
    tok = build_tokenizer(train_texts=CORPUS, vocab_size=300)
    texts = [" ".join(CORPUS[i % 5].split()[: 3 + i % 6]) for i in range(4000)]
    ids, _ = encode(tok, texts, max_len=16)
    masked, labels = mask_tokens(ids, tok, 0.15, torch.Generator().manual_seed(0))
    special = torch.isin(ids, torch.tensor(tok.all_special_ids))
    selected = labels != -100
    assert not (selected & special).any()  # [CLS], [SEP], [PAD] are never selected
    assert torch.equal(labels[selected], ids[selected])
    assert torch.equal(masked[~selected], ids[~selected])
    rate = selected.sum() / (~special).sum()
    assert abs(rate - 0.15) < 0.01, rate  # n ~ 24k tokens: 5 sigma ~ 0.012
    n = selected.sum()
    to_mask = (masked == tok.mask_token_id) & selected
    kept = (masked == ids) & selected
    assert abs(to_mask.sum() / n - 0.8) < 0.03
    # 10% random words from the whole vocabulary; a random word can equal the original (1/|V|), counted as kept
    assert abs((selected & ~to_mask & ~kept).sum() / n - 0.1) < 0.02 and abs(kept.sum() / n - 0.1) < 0.02
    again, _ = mask_tokens(ids, tok, 0.15, torch.Generator().manual_seed(0))
    assert torch.equal(again, masked)  # reproducible from the generator


def test_trained_vocabulary_is_the_same_in_every_process(tmp_path):
    """A restarted run (or another rank) must get the vocabulary the first process built."""
    import json
    import os
    import subprocess
    import sys

    script = ("import json, sys; from alpro.data import build_tokenizer; "
              "print(json.dumps(build_tokenizer(train_texts=json.loads(sys.argv[1]), vocab_size=60).get_vocab(), "
              "sort_keys=True))")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}  # another process with another hash seed
    out = subprocess.run([sys.executable, "-c", script, json.dumps(CORPUS)], env=env, check=True,
                         capture_output=True, text=True)
    other = json.loads(out.stdout.strip().splitlines()[-1])
    assert other == build_tokenizer(train_texts=CORPUS, vocab_size=60).get_vocab()
    assert len(other) >= 60  # every character is kept even when the budget is small
