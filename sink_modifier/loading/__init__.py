"""Loading checkpoints the way a pruning run needs them: resolved, repaired, checked.

``checkpoints`` (``load_model``), ``remote_code`` (load-time repairs of published remote code under the pinned
transformers), ``sources`` (standard library only: where a model comes from, checked before torch is imported).
"""
