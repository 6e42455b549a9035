"""Scoring pruned models: masked-diffusion ELBO and exact perplexity (``perplexity``), the lm-eval model
``diffusion_lm`` (``harness``) with its offline tasks (``tasks``), and interleaved timing (``speed``).

Built on the plugin (families' scoring roles, loading); the plugin never imports it.
"""
