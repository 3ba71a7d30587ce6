"""The KubeRay RayJob that runs one placement attempt of a FineTuneJob.

Everything vendor-specific (resource name, labels, tolerations, image, Ray resource, visible
devices variable) comes from the catalog profile on the candidate.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.builders.common import (
    CHOICE_ANNOTATION, CONFIG_DIR, CONFIG_FILE, TRAIN_ENTRYPOINT, config_configmap_name, dns_label, labels,
    object_meta, progress_configmap_name, rayjob_name,
)
from tuneserve.builders.rbac import pod_service_account
from tuneserve.catalog import AcceleratorProfile, Catalog
from tuneserve.inventory import DEFAULT_POOL, POOL_LABEL
from tuneserve.placement import Candidate, pod_tolerations
from tuneserve_workers import contract

RAY_VERSION = "2.60.0"
TTL_SECONDS_AFTER_FINISHED = 300
RESERVED_ENV_PREFIX = "TUNESERVE_"


def _secret_env(name: str, ref: Any) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def build_env(job: FineTuneJob, profile: AcceleratorProfile) -> list[dict[str, Any]]:
    """Operator variables, then Secret references (never values), then the user's plain env
    (names starting with TUNESERVE_ are reserved and dropped)."""
    namespace, name = job.metadata.namespace, job.metadata.name
    env: list[dict[str, Any]] = [
        {"name": contract.CONFIG_ENV, "value": f"{CONFIG_DIR}/{CONFIG_FILE}"},
        {"name": contract.PROGRESS_CONFIGMAP_ENV, "value": f"{namespace}/{progress_configmap_name(name)}"},
    ]
    if profile.visible_devices_env:
        env.append({"name": "TUNESERVE_VISIBLE_DEVICES_ENV", "value": profile.visible_devices_env})
    creds = job.spec.credentials
    if creds:
        if creds.hugging_face_token:
            env.append(_secret_env("HF_TOKEN", creds.hugging_face_token))
        store = creds.object_store
        if store:
            env.append(_secret_env("AWS_ACCESS_KEY_ID", store.access_key_id))
            env.append(_secret_env("AWS_SECRET_ACCESS_KEY", store.secret_access_key))
            if store.session_token:
                env.append(_secret_env("AWS_SESSION_TOKEN", store.session_token))
            if store.endpoint_url:
                env.append({"name": "AWS_ENDPOINT_URL", "value": store.endpoint_url})
            if store.region:
                env.append({"name": "AWS_DEFAULT_REGION", "value": store.region})
        for item in creds.secret_env or []:
            env.append(_secret_env(item.name, item.secret_key_ref))
    taken = {e["name"] for e in env}
    env += [{"name": e.name, "value": e.value} for e in job.spec.env or []
            if not e.name.startswith(RESERVED_ENV_PREFIX) and e.name not in taken]
    return env


def _volumes(job: FineTuneJob, attempt: int) -> list[dict[str, Any]]:
    return [
        {"name": "tuneserve-config", "configMap": {"name": config_configmap_name(job.metadata.name, attempt)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]


_MOUNTS = [
    {"name": "tuneserve-config", "mountPath": CONFIG_DIR, "readOnly": True},
    {"name": "dshm", "mountPath": "/dev/shm"},
]


def _node_affinity(profile: AcceleratorProfile) -> Optional[dict[str, Any]]:
    if not profile.node_labels_any_of:
        return None
    expressions = [{"key": k, "operator": "In", "values": list(v)} for k, v in sorted(profile.node_labels_any_of.items())]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": expressions}]}}}


def _pod_spec(job: FineTuneJob, profile: AcceleratorProfile, attempt: int, container: dict[str, Any],
              node_selector: dict[str, str], affinity: Optional[dict[str, Any]]) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "serviceAccountName": pod_service_account(job),
        "containers": [container],
        "volumes": _volumes(job, attempt),
        "tolerations": pod_tolerations(profile, job.spec),
    }
    if node_selector:
        spec["nodeSelector"] = dict(sorted(node_selector.items()))
    if affinity:
        spec["affinity"] = affinity
    if job.spec.priority_class_name:
        spec["priorityClassName"] = job.spec.priority_class_name
    return spec


def _ray_start_resources(profile: AcceleratorProfile, devices: int) -> dict[str, str]:
    """KubeRay turns limits ending in "gpu" into num-gpus itself; other accelerators need
    `--resources` in the form KubeRay passes through verbatim: "{\\"NPU\\": 8}" (quoted JSON)."""
    if not profile.ray_resource or profile.ray_resource_auto_mapped:
        return {}
    payload = json.dumps({profile.ray_resource: devices * profile.ray_resources_per_device}).replace('"', '\\"')
    return {"resources": f'"{payload}"'}


def _plain_tree(obj: dict[str, Any]) -> dict[str, Any]:
    return json.loads(json.dumps(obj))


def build_rayjob(job: FineTuneJob, candidate: Candidate, pool: Optional[str], attempt: int,
                 catalog: Catalog) -> dict[str, Any]:
    """RayJob (ray.io/v1, K8sJobMode) with a CPU-only head and one worker group of
    ``candidate.workers`` pods, each requesting ``devices_per_worker`` devices."""
    profile = candidate.profile
    image = (job.spec.image_overrides or {}).get(profile.vendor) or profile.images.train
    env = build_env(job, profile)
    pod_labels = labels(job, attempt)
    user_selector = dict(job.spec.node_selector or {})

    head_resources = dict(catalog.defaults.head)
    head_container = {
        "name": "ray-head",
        "image": image,
        "env": env,
        "resources": {"requests": head_resources, "limits": head_resources},
        "volumeMounts": _MOUNTS,
    }
    worker_resources = profile.worker_resources(candidate.devices_per_worker)
    worker_container = {
        "name": "ray-worker",
        "image": image,
        "env": env,
        "resources": {"requests": worker_resources, "limits": worker_resources},
        "volumeMounts": _MOUNTS,
    }
    worker_selector = {**profile.node_labels, **user_selector}
    if pool and pool != DEFAULT_POOL:
        worker_selector[POOL_LABEL] = pool

    name = rayjob_name(job.metadata.name, attempt)
    # A JSON round trip: the pod specs share env/labels/mounts while building; callers get a plain
    # tree with no shared sub-objects (deepcopy would keep the sharing).
    return _plain_tree({
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": object_meta(job, name, attempt, annotations={CHOICE_ANNOTATION: candidate.key}),
        "spec": {
            "entrypoint": TRAIN_ENTRYPOINT,
            "submissionMode": "K8sJobMode",
            "shutdownAfterJobFinishes": True,
            "ttlSecondsAfterFinished": TTL_SECONDS_AFTER_FINISHED,
            "backoffLimit": job.spec.backoff_limit,
            "suspend": job.spec.suspend,
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                    "template": {
                        "metadata": {"labels": pod_labels},
                        "spec": _pod_spec(job, profile, attempt, head_container, user_selector, None),
                    },
                },
                "workerGroupSpecs": [{
                    "groupName": dns_label(f"{profile.vendor}-{profile.product}"),
                    "replicas": candidate.workers,
                    "minReplicas": candidate.workers,
                    "maxReplicas": candidate.workers,
                    "rayStartParams": _ray_start_resources(profile, candidate.devices_per_worker),
                    "template": {
                        "metadata": {"labels": pod_labels},
                        "spec": _pod_spec(job, profile, attempt, worker_container, worker_selector, _node_affinity(profile)),
                    },
                }],
            },
        },
    })
