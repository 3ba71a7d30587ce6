"""Leader election on a coordination.k8s.io Lease, so the chart can run two operator replicas:
one reconciles, the other waits and takes over when the first goes away.

kopf's own peering only pauses operators of lower priority and never hands over, so the
operator does what client-go's leaderelection does: the holder renews the Lease every
``renew_seconds``; a candidate takes it once ``renewTime + leaseDurationSeconds`` has passed; a
holder shutting down releases it (empty holder), so the standby takes over at its next retry
instead of waiting out the lease. ``decide`` is the pure rule; ``LeaderElector`` does the I/O.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from enum import Enum
from typing import Any, Callable, Mapping, Optional

from tuneserve.controller.apiclient import ApiError, Client, object_path

log = logging.getLogger(__name__)
MICRO = "%Y-%m-%dT%H:%M:%S.%fZ"
LEASES = "coordination.k8s.io/v1"


@dataclass(frozen=True)
class ElectionTiming:
    """client-go's defaults scaled down: takeover after a crash within lease_seconds + retry."""
    lease_seconds: int = 15
    renew_seconds: float = 5.0
    retry_seconds: float = 2.0


class Action(str, Enum):
    """What a candidate does with the Lease it just read."""
    Acquire = "Acquire"   # free, expired or released: write our identity (a new term)
    Renew = "Renew"       # ours: move renewTime
    Wait = "Wait"         # held by a live peer


def _parse_time(value: Optional[str]) -> Optional[datetime]:
    if not value:
        return None
    for fmt in (MICRO, "%Y-%m-%dT%H:%M:%SZ"):
        try:
            return datetime.strptime(value, fmt).replace(tzinfo=timezone.utc)
        except ValueError:
            continue
    return None


def decide(lease_spec: Optional[Mapping[str, Any]], identity: str, now: datetime) -> Action:
    """The election rule on a Lease's spec (None: no Lease yet)."""
    spec = lease_spec or {}
    holder = spec.get("holderIdentity") or ""
    if holder == identity:
        return Action.Renew
    renewed = _parse_time(spec.get("renewTime") or spec.get("acquireTime"))
    duration = int(spec.get("leaseDurationSeconds") or 0)
    if not holder or renewed is None or now >= renewed + timedelta(seconds=duration):
        return Action.Acquire
    return Action.Wait


def lease_spec_for(action: Action, previous: Optional[Mapping[str, Any]], identity: str, now: datetime,
                   timing: ElectionTiming) -> dict[str, Any]:
    """The spec to write for ``action`` (Acquire starts a term: acquireTime, transitions + 1)."""
    prev = dict(previous or {})
    stamp = now.strftime(MICRO)
    spec = {**prev, "holderIdentity": identity, "leaseDurationSeconds": timing.lease_seconds, "renewTime": stamp}
    if action is Action.Acquire:
        spec["acquireTime"] = stamp
        spec["leaseTransitions"] = int(prev.get("leaseTransitions") or 0) + (1 if prev.get("holderIdentity") else 0)
    return spec


class LeaderElector:
    """Holds the Lease ``namespace/name`` for ``identity`` while this process reconciles."""

    def __init__(self, api: Client, namespace: str, name: str, identity: str,
                 timing: ElectionTiming = ElectionTiming(), clock: Callable[[], datetime] = lambda: datetime.now(timezone.utc)):
        self.api, self.namespace, self.name, self.identity = api, namespace, name, identity
        self.timing, self.clock = timing, clock
        self.leading = threading.Event()
        self.lost = threading.Event()
        self.path = object_path(LEASES, "leases", namespace, name)

    def _read(self) -> Optional[dict[str, Any]]:
        """The Lease; None when there is none yet. Raises ApiError for any other failure."""
        try:
            return self.api.request("GET", self.path)
        except ApiError as exc:
            if exc.status != 404:
                raise
            return None

    def try_once(self) -> bool:
        """One read-decide-write round; True when we hold the Lease afterwards. A conflict (a peer
        wrote in between) or an API error counts as not holding it."""
        now = self.clock()
        try:
            lease = self._read()
        except ApiError as exc:
            log.warning("reading Lease %s/%s: %s", self.namespace, self.name, exc.reason)
            return False
        spec = (lease.get("spec") or {}) if lease is not None else None
        action = decide(spec, self.identity, now)
        if action is Action.Wait:
            return False
        body = {"apiVersion": LEASES, "kind": "Lease", "metadata": {"name": self.name, "namespace": self.namespace},
                "spec": lease_spec_for(action, spec, self.identity, now, self.timing)}
        try:
            if lease is None:
                self.api.request("POST", object_path(LEASES, "leases", self.namespace), body)
            else:
                body["metadata"]["resourceVersion"] = lease["metadata"]["resourceVersion"]   # optimistic lock
                self.api.request("PUT", self.path, body)
        except ApiError as exc:
            if exc.status not in (409, 422):
                log.warning("writing Lease %s/%s: %s", self.namespace, self.name, exc.reason)
            return False
        if action is Action.Acquire:
            log.info("acquired leadership (Lease %s/%s) as %s", self.namespace, self.name, self.identity)
        return True

    def acquire(self, stop: threading.Event) -> bool:
        """Blocks until leading (True) or ``stop`` is set (False)."""
        while not stop.is_set():
            if self.try_once():
                self.leading.set()
                return True
            stop.wait(self.timing.retry_seconds)
        return False

    def keep(self, stop: threading.Event) -> None:
        """Renews until ``stop``; sets ``lost`` when no renewal succeeded for a whole lease term
        (a peer may already act: the caller must stop reconciling)."""
        last_ok = self.clock()
        while not stop.wait(self.timing.renew_seconds if self.leading.is_set() else self.timing.retry_seconds):
            if self.try_once():
                last_ok = self.clock()
                continue
            if (self.clock() - last_ok).total_seconds() >= self.timing.lease_seconds - self.timing.retry_seconds:
                log.error("lost leadership (Lease %s/%s not renewed)", self.namespace, self.name)
                self.leading.clear()
                self.lost.set()
                return

    def release(self) -> None:
        """Gives the Lease up on a clean shutdown so the standby need not wait out the term."""
        try:
            lease = self._read()
            spec = (lease or {}).get("spec") or {}
            if lease is None or spec.get("holderIdentity") != self.identity:
                return
            lease["spec"] = {**spec, "holderIdentity": "", "leaseDurationSeconds": 1}
            self.api.request("PUT", self.path, lease)
            log.info("released leadership (Lease %s/%s)", self.namespace, self.name)
        except ApiError as exc:
            log.warning("releasing Lease %s/%s: %s", self.namespace, self.name, exc.reason)
        finally:
            self.leading.clear()
