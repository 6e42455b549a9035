"""The trajectory phase and the ``diffusion`` pipeline: denoising states, attention mass, sink statistics.

``trajectory`` runs a family's states under the attention ``probe``; ``statistics`` turns masses into sink scores,
variances and row scales; ``scales`` maps them to calibration rows; ``pipeline`` is the ``diffusion`` calibration
pipeline, which hands its measured calibration (``handoff``) to the modifiers.
"""
