"""The recipe entries: llm-compressor modifiers that prune with sink-aware statistics.

``weight_pruning`` (``SinkAwarePruningModifier``: unstructured / N:M through llm-compressor's Wanda and
SparseGPT), ``structured`` (``SinkAwareStructuredPruningModifier``: whole MLP channels and KV-head groups) and
``experts`` (``SinkAwareExpertPruningModifier``: whole routed experts, REAP's saliency) share ``sink_rows`` (the
sink lifecycle: family, trajectory, each row's sink scale) and ``scope`` (what may be pruned).
"""
