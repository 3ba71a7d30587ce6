"""Which adapters a ModelServe should load now, and what state each one is in.

Two pure steps:
1. ``resolve_adapters``: spec.adapters + the referenced FineTuneJobs (as observed) + the base
   model -> the desired set for ConfigMap ``<ms>-adapters`` and a state for every adapter that
   cannot be desired yet (Pending: its job has not Succeeded; Failed: trained on another base
   model, or a rank above engine.maxLoraRank). A bad adapter never blocks the others.
2. ``adapter_states``: the desired set + the replicas' reports (ConfigMap ``<ms>-serve-status``,
   ``contract.ServeReplicaReport`` per key) -> Pending / Loading / Loaded / Failed per adapter.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Mapping, Optional

from pydantic import ValidationError

from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.api.modelserve import AdapterSource, ModelServeSpec
from tuneserve.api.modelserve_status import AdapterState
from tuneserve.api.sources import BaseModelSource
from tuneserve.api.finetunejob_status import Phase
from tuneserve_workers.contract import (
    SERVE_FAILURE_REPORT_SECONDS, SERVE_REPORT_STALE_SECONDS, SERVE_STATUS_KEY_PREFIX, ServeAdapter,
    ServeReplicaReport,
)


@dataclass(frozen=True)
class AdapterVerdict:
    """One listed adapter after resolution: ``uri`` set when it is desired (goes to the
    ConfigMap); otherwise ``state``/``message`` say why not."""
    name: str
    source: str
    uri: Optional[str]
    state: AdapterState
    message: str


@dataclass(frozen=True)
class AdapterResolution:
    verdicts: tuple[AdapterVerdict, ...]

    @property
    def desired(self) -> list[ServeAdapter]:
        """The set the replicas load, in spec order."""
        return [ServeAdapter(name=v.name, uri=v.uri) for v in self.verdicts if v.uri is not None]


def same_base_model(trained_on: str, served: BaseModelSource) -> bool:
    """Same location; revisions must agree only when both name one (as the serve app checks)."""
    other = BaseModelSource(uri=trained_on) if trained_on else None
    if other is None:
        return False
    if other.location().rstrip("/") != served.location().rstrip("/"):
        return False
    return not (other.revision() and served.revision() and other.revision() != served.revision())


def _from_job(adapter: AdapterSource, body: Optional[Mapping[str, Any]], spec: ModelServeSpec) -> AdapterVerdict:
    assert adapter.fine_tune_job_ref is not None
    job_name = adapter.fine_tune_job_ref.name
    source = adapter.source()

    def verdict(state: AdapterState, message: str, uri: Optional[str] = None) -> AdapterVerdict:
        return AdapterVerdict(adapter.name, source, uri, state, message)

    if body is None:
        return verdict(AdapterState.Pending, f"FineTuneJob {job_name} not found in this namespace; waiting for it")
    try:
        job = FineTuneJob.from_body(body)
    except ValidationError as e:
        return verdict(AdapterState.Failed, f"FineTuneJob {job_name} cannot be read: {e.errors()[0].get('msg', e)}")
    status = job.status
    phase = status.phase if status else Phase.Pending
    if phase == Phase.Failed:
        why = (status.message if status and status.message else "training failed")
        return verdict(AdapterState.Failed, f"FineTuneJob {job_name} failed: {why}")
    if phase != Phase.Succeeded:
        progress = f", {status.progress.summary}" if status and status.progress and status.progress.summary else ""
        return verdict(AdapterState.Pending, f"waiting for FineTuneJob {job_name} to succeed (phase {phase.value}{progress})")
    artifact = status.artifact if status else None
    if artifact is None:
        return verdict(AdapterState.Pending, f"FineTuneJob {job_name} succeeded but reports no adapter artifact yet")
    trained_on = artifact.base_model or job.spec.base_model.uri
    if not same_base_model(trained_on, spec.base_model):
        return verdict(AdapterState.Failed,
                       f"adapter {adapter.name} was trained on {trained_on} but this ModelServe serves {spec.base_model.uri}")
    if artifact.rank > spec.engine.max_lora_rank:
        return verdict(AdapterState.Failed,
                       f"adapter {adapter.name} has rank {artifact.rank} but engine.maxLoraRank is {spec.engine.max_lora_rank}; "
                       f"raise engine.maxLoraRank to at least {artifact.rank}")
    return verdict(AdapterState.Pending, "waiting for the replicas to load it", artifact.uri)


def resolve_adapters(spec: ModelServeSpec, jobs: Mapping[str, Optional[Mapping[str, Any]]]) -> AdapterResolution:
    """``jobs``: FineTuneJob name -> its body as observed (None or absent: not found)."""
    verdicts = []
    for adapter in spec.adapters:
        if adapter.fine_tune_job_ref is not None:
            verdicts.append(_from_job(adapter, jobs.get(adapter.fine_tune_job_ref.name), spec))
        else:
            verdicts.append(AdapterVerdict(adapter.name, adapter.source(), adapter.uri, AdapterState.Pending,
                                           "waiting for the replicas to load it"))
    return AdapterResolution(tuple(verdicts))


def render_adapters_json(desired: list[ServeAdapter]) -> str:
    """The ConfigMap payload: a JSON list of {name, uri}, spec order, deterministic."""
    return json.dumps([a.model_dump(mode="json") for a in desired], indent=2, sort_keys=True) + "\n"


@dataclass(frozen=True)
class ReplicaReports:
    """The fresh replica reports of one ModelServe, the recent failures (a replica whose engine
    could not start or died: its last report, newest first), and the keys of stale ones."""
    fresh: tuple[ServeReplicaReport, ...]
    stale_keys: tuple[str, ...]
    unreadable_keys: tuple[str, ...]
    failed: tuple[ServeReplicaReport, ...] = ()

    @property
    def ready(self) -> tuple[ServeReplicaReport, ...]:
        return tuple(r for r in self.fresh if r.state == "Ready")

    def target_replicas(self) -> Optional[int]:
        targets = [r.target_replicas for r in self.fresh if r.target_replicas is not None]
        return max(targets) if targets else None


def read_replica_reports(data: Optional[Mapping[str, str]], now: datetime,
                         stale_after: timedelta = timedelta(seconds=SERVE_REPORT_STALE_SECONDS),
                         failures_for: timedelta = timedelta(seconds=SERVE_FAILURE_REPORT_SECONDS)) -> ReplicaReports:
    """Parse ConfigMap ``<ms>-serve-status`` data; reports older than ``stale_after`` are gone
    replicas (their keys are returned for pruning), unreadable ones are skipped. A Failed report
    is a replica's last word, so it counts for ``failures_for`` instead."""
    fresh, stale, bad, failed = [], [], [], []
    for key in sorted(data or {}):
        if not key.startswith(SERVE_STATUS_KEY_PREFIX):
            continue
        try:
            report = ServeReplicaReport.model_validate_json((data or {})[key])
        except ValidationError:
            bad.append(key)
            continue
        age = now - report.updated_at
        if age > (failures_for if report.state == "Failed" else stale_after):
            stale.append(key)
        elif report.state == "Failed":
            failed.append(report)
        else:
            fresh.append(report)
    failed.sort(key=lambda r: r.updated_at, reverse=True)
    return ReplicaReports(tuple(fresh), tuple(stale), tuple(bad), tuple(failed))


def adapter_states(resolution: AdapterResolution, reports: ReplicaReports) -> list[AdapterVerdict]:
    """Every listed adapter with its state. A desired adapter is Loaded when every ready replica
    reports it Loaded from the desired URI, Failed when any replica failed it, Loading when some
    replicas have it, else Pending."""
    ready = reports.ready
    out = []
    for v in resolution.verdicts:
        if v.uri is None:
            out.append(v)
            continue
        seen = [(r, r.adapters.get(v.name)) for r in ready]
        current = [(r, a) for r, a in seen if a is not None and (a.uri is None or a.uri == v.uri)]
        failed = [(r, a) for r, a in current if a.state == "Failed"]
        loaded = [a for _, a in current if a.state == "Loaded"]
        if failed:
            replica, report = failed[0]
            out.append(AdapterVerdict(v.name, v.source, v.uri, AdapterState.Failed,
                                      f"replica {replica.replica_id}: {report.message or 'load failed'}"))
        elif ready and len(loaded) == len(ready):
            out.append(AdapterVerdict(v.name, v.source, v.uri, AdapterState.Loaded,
                                      f"loaded on {len(ready)} replica{'s' if len(ready) != 1 else ''}"))
        elif current:
            out.append(AdapterVerdict(v.name, v.source, v.uri, AdapterState.Loading,
                                      f"loaded on {len(loaded)} of {len(ready)} ready replicas"))
        elif not ready:
            out.append(AdapterVerdict(v.name, v.source, v.uri, AdapterState.Pending, "waiting for a ready replica"))
        else:
            out.append(v)
    return out
