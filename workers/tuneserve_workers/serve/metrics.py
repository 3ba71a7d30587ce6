"""Prometheus metrics of one replica, published twice:

- through Ray's metrics pipeline (``ray.serve.metrics``), which the Ray pods' metrics port (8080)
  exports with the replica/deployment/application tags Ray adds: what a PodMonitor scrapes in a
  KubeRay cluster, summed across replicas;
- on the replica's own route ``/tuneserve/metrics`` (prometheus_client text format), handy for
  tests and ad-hoc checks (it answers for whichever replica the request lands on).

vLLM's own engine metrics (``vllm:*``, including ``vllm:lora_requests_info``) are on ``/metrics``.

Names: ``tuneserve_adapters{state}`` (gauge: adapters Loading/Loaded/Failed on this replica),
``tuneserve_adapter_loaded{adapter}`` (gauge 0/1), ``tuneserve_requests_total{model}`` (counter:
generation requests per served name, base or adapter), ``tuneserve_replica_ready`` (gauge 0/1,
the last readiness probe).
"""
from __future__ import annotations

import logging

log = logging.getLogger("tuneserve.serve.metrics")
STATES = ("Loading", "Loaded", "Failed")


class ServeMetrics:
    def __init__(self, use_ray: bool = True):
        from prometheus_client import CollectorRegistry, Counter, Gauge
        self.registry = CollectorRegistry()
        self._p_adapters = Gauge("tuneserve_adapters", "LoRA adapters on this replica by state",
                                 ["state"], registry=self.registry)
        self._p_loaded = Gauge("tuneserve_adapter_loaded", "1 when the adapter is loaded",
                               ["adapter"], registry=self.registry)
        self._p_requests = Counter("tuneserve_requests", "Generation requests per served model",
                                   ["model"], registry=self.registry)
        self._p_ready = Gauge("tuneserve_replica_ready", "1 when the last readiness probe passed",
                              registry=self.registry)
        self._ray = None
        if use_ray:
            try:
                from ray.serve import metrics as rm
                self._ray = {
                    "adapters": rm.Gauge("tuneserve_adapters", "LoRA adapters by state",
                                         tag_keys=("state",)),
                    "loaded": rm.Gauge("tuneserve_adapter_loaded", "1 when the adapter is loaded",
                                       tag_keys=("adapter",)),
                    "requests": rm.Counter("tuneserve_requests_total",
                                           "Generation requests per served model",
                                           tag_keys=("model",)),
                    "ready": rm.Gauge("tuneserve_replica_ready", "last readiness probe passed"),
                }
            except Exception as e:  # not inside Ray: the local registry still works
                log.info("ray.serve.metrics unavailable: %s", e)
        self._known: set[str] = set()

    def request(self, model: str) -> None:
        self._p_requests.labels(model).inc()
        if self._ray:
            self._ray["requests"].inc(1, tags={"model": model})

    def ready(self, ok: bool) -> None:
        self._p_ready.set(1 if ok else 0)
        if self._ray:
            self._ray["ready"].set(1 if ok else 0)

    def adapters(self, states) -> None:
        counts = dict.fromkeys(STATES, 0)
        loaded = {}
        for st in states:
            counts[st.state] = counts.get(st.state, 0) + 1
            loaded[st.name] = 1 if st.state == "Loaded" else 0
        for name in self._known - set(loaded):
            loaded[name] = 0          # removed: report 0 rather than a stale 1
        self._known |= set(loaded)
        for state, n in counts.items():
            self._p_adapters.labels(state).set(n)
            if self._ray:
                self._ray["adapters"].set(n, tags={"state": state})
        for name, v in loaded.items():
            self._p_loaded.labels(name).set(v)
            if self._ray:
                self._ray["loaded"].set(v, tags={"adapter": name})

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        return generate_latest(self.registry), CONTENT_TYPE_LATEST
