"""Applications built on a trained model, apart from training: text -> video search, indexing and zero-shot
classification (:mod:`alpro.apps.search`), and the end-to-end demo with its report (:mod:`alpro.apps.demo`)."""
