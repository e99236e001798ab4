"""The compiled core (``_C``), imported in one place so that a missing build says what to do.

``_C`` is built by ``pip install .`` (into site-packages) or ``pip install -e .`` /
``python setup.py build_ext --inplace`` (next to this file). A source tree that was never
built has only the Python files; importing it must not end in a bare ImportError traceback.
"""

from __future__ import annotations

import os


class NativeCoreMissing(ImportError):
    """The compiled core ``torch_elastic_kv._C`` cannot be imported; the message says how to fix it."""


def _missing_message(exc: ImportError) -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    return (
        f"torch_elastic_kv's compiled core (_C) cannot be loaded from {here} ({exc}); this package "
        f"directory was never built. Install it with `pip install .` (or `pip install -e .` in a "
        f"checkout, or build in place with `python setup.py build_ext --inplace`), then run again."
    )


try:
    from . import _C  # noqa: F401  (re-exported)
except ImportError as _exc:  # a source tree without the build, or a build for another Python
    raise NativeCoreMissing(_missing_message(_exc)) from _exc

__all__ = ["_C", "NativeCoreMissing"]
