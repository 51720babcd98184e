"""Corpus tools, no model and no trainer: the embedded 'shapes world' generator (:mod:`alpro.corpus.synth`) and the
PEM entity-list builder that counts nouns in captions (:mod:`alpro.corpus.entities`)."""
