"""ALPRO (Align and Prompt) video-language pre-training on streaming WebDataset shards.

Sub-packages: ``alpro.sharding`` (top-level ``sharding/``), ``alpro.data`` (streaming loader),
``alpro.models`` (TimeSformer + BERT ALPRO), ``alpro.kernels`` (top-level ``kernels/``: Triton kernels and
their dispatch), ``alpro.train`` (DeepSpeed trainer and jobs).
"""

__version__ = "0.1.0"
