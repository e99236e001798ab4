"""``python -m torch_elastic_kv bench ...``: the benchmark harness (see torch_elastic_kv.bench)."""
from __future__ import annotations

import sys

from torch_elastic_kv.bench.cli import main

if __name__ == "__main__":
    sys.exit(main())
