"""The ``sink-prune`` script: ``sink_modifier/cli/main.py`` run without importing the ``sink_modifier`` package
first.

``import sink_modifier`` imports llm-compressor to register the modifier (seconds, and a "No accelerator" line on
stdout). ``--help`` and ``--version`` need only argparse, so the CLI module is loaded by itself (it loads the
light modules it needs, ``errors``, ``sources`` and ``console``, the same way); a command imports the package
when it runs. ``python -m sink_modifier.cli`` is the same CLI, without this shortcut.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

__all__ = ["main"]


def main() -> int:
    if "sink_modifier.cli.main" not in sys.modules:
        package = importlib.util.find_spec("sink_modifier")  # finds the package without importing it
        path = Path(package.submodule_search_locations[0]) / "cli" / "main.py"
        spec = importlib.util.spec_from_file_location("sink_modifier.cli.main", path)
        module = importlib.util.module_from_spec(spec)
        sys.modules["sink_modifier.cli.main"] = module  # the package's own imports of the CLI get this module
        spec.loader.exec_module(module)
    return sys.modules["sink_modifier.cli.main"].main()


if __name__ == "__main__":
    sys.exit(main())
