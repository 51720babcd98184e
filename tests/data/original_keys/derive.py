"""Derive the original ALPRO state_dict key lists (tests/data/original_keys/*.txt) from the parity reference.

    python tests/data/original_keys/derive.py      # rewrites the three .txt files next to this script

Source of truth: ``tests/data/parity/pretrain/param_spec.json``, which lists every ``named_parameters()`` name and
shape of the original ``AlproForPretrain`` (salesforce/ALPRO 4ff6163, ``src/modeling/alpro_models.py``) as the
original code itself produced them when it was run, shrunk (2 TimeSformer blocks, 4 BERT layers with
``fusion_layer`` 2, width 768, 16 entities), plus its tied aliases and buffers. The two other classes are derived
from it by reading their constructors in the original source:

- ``AlproForVideoTextRetrieval.__init__`` only calls ``AlproBaseModel.__init__``: its keys are the pre-training
  model's minus the ``Prompter`` (``prompter.*``) and ``mpm_head.*``, in the same order.
- ``AlproForSequenceClassification.__init__`` replaces ``text_encoder`` (a ``BertForMaskedLM``) by
  ``BertModel(add_pooling_layer=False)`` in the same slot, so ``text_encoder.bert.X`` becomes ``text_encoder.X``
  and ``text_encoder.cls.*`` disappears; then it appends ``classifier`` = Linear(768, 1536), ReLU,
  Linear(1536, num_labels). Everything it inherits from ``AlproBaseModel`` (``temp``, ``vision_proj``,
  ``text_proj``, ``itm_head``) stays in its state_dict although its forward never uses it.

The full-size models have the same names with blocks 0..11 and layers 0..11; only the indices and widths differ.
"""

from __future__ import annotations

import json
from pathlib import Path

HERE = Path(__file__).parent
SPEC = HERE.parent / "parity" / "pretrain" / "param_spec.json"
NUM_LABELS = 1500  # the answer vocabulary size; any value gives the same names
HEADER = """# {cls}: every state_dict key of the original salesforce/ALPRO 4ff6163 class: named_parameters() in
# order, then the tied aliases and the buffers that state_dict also holds, at the shrunk size of the
# pre-training parity reference: 2 TimeSformer blocks, 4 BERT layers (fusion_layer 2), width 768, 16 entities.
# Derived by tests/data/original_keys/derive.py from tests/data/parity/pretrain/param_spec.json (the names and
# shapes the original code produced when it was run); {how}
# columns: key <TAB> shape <TAB> kind (param | alias: a second name of a tied tensor | buffer)
"""


def pretrain_keys(spec: dict) -> list[tuple[str, list[int], str]]:
    rows = [(p["name"], p["shape"], "param") for p in spec["params"]]
    shapes = {name: shape for name, shape, _ in rows}
    rows += [(alias, shapes[target], "alias") for alias, target in spec["aliases"].items()]
    rows += [(b["name"], b["shape"], "buffer") for b in spec["buffers"]]
    return rows


def retrieval_keys(pretrain: list[tuple[str, list[int], str]]) -> list[tuple[str, list[int], str]]:
    return [r for r in pretrain if not r[0].startswith(("prompter.", "mpm_head."))]


def qa_keys(retrieval: list[tuple[str, list[int], str]]) -> list[tuple[str, list[int], str]]:
    rows = []
    for name, shape, kind in retrieval:
        if name.startswith("text_encoder.cls."):
            continue
        rows.append((name.replace("text_encoder.bert.", "text_encoder.", 1), shape, kind))
    width = next(s for n, s, _ in rows if n == "itm_head.weight")[1]
    classifier = [("classifier.0.weight", [2 * width, width]), ("classifier.0.bias", [2 * width]),
                  ("classifier.2.weight", [NUM_LABELS, 2 * width]), ("classifier.2.bias", [NUM_LABELS])]
    params = [r for r in rows if r[2] == "param"] + [(n, s, "param") for n, s in classifier]
    return params + [r for r in rows if r[2] != "param"]


def write(cls: str, how: str, rows: list[tuple[str, list[int], str]]) -> None:
    lines = [f"{name}\t{json.dumps(shape)}\t{kind}" for name, shape, kind in rows]
    (HERE / f"{cls}.txt").write_text(HEADER.format(cls=cls, how=how) + "\n".join(lines) + "\n")


def main() -> None:
    spec = json.loads(SPEC.read_text())
    pretrain = pretrain_keys(spec)
    write("AlproForPretrain", "the spec's params, aliases and buffers as listed.", pretrain)
    write("AlproForVideoTextRetrieval", "AlproForPretrain's keys without prompter.* and mpm_head.* "
          "(its __init__ adds nothing to AlproBaseModel).", retrieval_keys(pretrain))
    write("AlproForSequenceClassification", "AlproForVideoTextRetrieval's keys with text_encoder a BertModel "
          f"(no 'bert.', no MLM head) and classifier.0/2 appended (num_labels {NUM_LABELS}).",
          qa_keys(retrieval_keys(pretrain)))


if __name__ == "__main__":
    main()
