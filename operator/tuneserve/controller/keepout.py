"""Keeps the `kubernetes` package out of the operator process: importing it cost ~55 MiB of the
operator's memory (issue 15), and the operator does not use it (apiclient.py).

The operator image does not install it, but a venv that has it for the tests does, and there kopf
imports it anyway, when kopf itself is imported: to recognise the client's models
(kopf/_cogs/helpers/thirdparty.py) and to choose a default login handler (registries.py). Refusing
the import makes an operator run from such a venv (tests, benches) the process the image runs."""
from __future__ import annotations

import importlib.abc
import sys
from typing import Any, Optional

KEPT_OUT = "kubernetes"


class _Refuse(importlib.abc.MetaPathFinder):
    """Answers every import of ``kubernetes`` or a submodule as if it were not installed."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Optional[Any]:
        if fullname.partition(".")[0] == KEPT_OUT:
            raise ModuleNotFoundError(f"No module named {fullname!r} (kept out of the operator: "
                                      "tuneserve/controller/keepout.py)", name=fullname)
        return None


def refuse_kubernetes() -> None:
    """Called before kopf is imported. A process that already imported `kubernetes` (a test that
    also imports the operator) keeps it: refusing its later submodule imports would break it."""
    if KEPT_OUT in sys.modules or any(isinstance(f, _Refuse) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _Refuse())
