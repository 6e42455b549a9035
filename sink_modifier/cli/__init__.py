"""The ``sink-prune`` command line: argument parsing (``main``, ``arguments``), terminal control (``console``),
the commands (``workflows``: run and eval; ``inspection``; ``demo``; ``compare``), pictures (``plots``) and the
mask-decision diagnostic (``diagnostics``).

The top of the package: nothing below imports it. ``main`` and the light modules it needs for ``--help`` are
loaded by file (``sink_prune.py``), so this ``__init__`` imports nothing.
"""
