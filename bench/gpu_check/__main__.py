"""``python bench/gpu_check ...`` (or ``python -m gpu_check`` from ``bench/``)."""

import sys
from pathlib import Path

# Run as a folder, Python puts this folder first on sys.path: put ``bench/`` there instead, so
# ``gpu_check`` is a package (relative imports work) and ``flops`` (bench/flops.py) imports,
# and no stage module shadows a top-level module of the same name.
_BENCH = str(Path(__file__).resolve().parents[1])
if sys.path and Path(sys.path[0] or ".").resolve() == Path(__file__).resolve().parent:
    sys.path[0] = _BENCH
elif _BENCH not in sys.path:
    sys.path.insert(0, _BENCH)

from gpu_check.runner import main  # noqa: E402

sys.exit(main())
