"""Optional dependencies of the trainer and the benchmarks (API.md §0: they need torch, and a missing
one is reported in one sentence naming the extra to install, never as a bare ModuleNotFoundError)."""
from __future__ import annotations

import importlib
from typing import Optional, Sequence

_PACKAGE_OF = {"torch": "PyTorch", "sklearn": "scikit-learn", "sentence_transformers": "sentence-transformers"}  # module -> what pip calls it


def install_hint(extra: str) -> str:
    return f"pip install 'lepton_core[{extra}]'"


def missing(modules: Sequence[str], what: str, extra: str) -> Optional[str]:
    """None when every module in `modules` imports; otherwise why `what` cannot run and the pip
    command that installs what it needs."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as exc:
            package = _PACKAGE_OF.get(name, name)
            return f"{what} needs {package}, which cannot be imported ({exc}); install it with {install_hint(extra)}"
    return None


def require(modules: Sequence[str], what: str, extra: str) -> None:
    """Raises ImportError (the message of `missing`) unless every module in `modules` imports."""
    msg = missing(modules, what, extra)
    if msg is not None:
        raise ImportError(msg)
