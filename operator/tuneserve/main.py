"""Entry point: `tuneserve-operator` (or `python -m tuneserve.main`).

Watches FineTuneJobs in all namespaces, or in those listed by TUNESERVE_NAMESPACES (comma
separated). Liveness: http://<TUNESERVE_HEALTH_ADDR or 0.0.0.0:8080>/healthz.
"""
from __future__ import annotations

import logging
import os
import sys

import kopf

import tuneserve.handlers  # noqa: F401  (registers the handlers)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("TUNESERVE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kopf logs every handler run at INFO; the operator logs what it writes (kubeapi.py) instead.
    logging.getLogger("kopf.objects").setLevel(os.environ.get("TUNESERVE_KOPF_LOG_LEVEL", "WARNING"))
    namespaces = [n for n in os.environ.get("TUNESERVE_NAMESPACES", "").split(",") if n]
    health = os.environ.get("TUNESERVE_HEALTH_ADDR", "0.0.0.0:8080")
    kopf.run(standalone=True, clusterwide=not namespaces, namespaces=namespaces,
             liveness_endpoint=f"http://{health}/healthz")
    return 0


if __name__ == "__main__":
    sys.exit(main())
