"""``python -m benchmarks.run``: the benchmark entry point (the suite lives in ``benchmarks/cli.py``).

Modules: ``common.py`` (shapes, probes, reference runtime, matmul rate), one per stage (``text.py``, ``dit.py``,
``decoder.py``, ``model_folder.py``), ``derive.py`` (end to end, memory plan, targets) and ``report.py``
(Markdown and chart). See ``benchmarks/cli.py`` for what is measured and how.
"""

import sys

from benchmarks.cli import add_parser, main, run  # noqa: F401  (`mlx-video bench` registers add_parser)

if __name__ == "__main__":
    sys.exit(main())
