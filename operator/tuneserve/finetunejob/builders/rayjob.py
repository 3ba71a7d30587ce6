"""The KubeRay RayJob that runs one placement attempt of a FineTuneJob.

Everything vendor-specific (resource name, labels, tolerations, image, Ray resource, visible
devices variable) comes from the catalog profile on the candidate.
"""
from __future__ import annotations

from typing import Any, Optional

from tuneserve.api.finetunejob import FineTuneJob
from tuneserve.builders.common import (
    CHOICE_ANNOTATION, CONFIG_DIR, CONFIG_FILE, TRAIN_ENTRYPOINT, config_configmap_name, dns_label, labels,
    object_meta, progress_configmap_name, rayjob_name,
)
from tuneserve.builders.raycluster import (
    RAY_VERSION, TRAIN_TERMINATION_GRACE_S, credential_env, host_volumes, image_for, node_affinity, plain_tree, pod_spec,
    pvc_volumes, ray_container, ray_start_resources, submitter_pod_template, with_user_env, worker_node_selector,
)
from tuneserve.finetunejob.builders.rbac import pod_service_account
from tuneserve.core.catalog import AcceleratorProfile, Catalog
from tuneserve.core.scheduling.fit import Candidate
from tuneserve_workers import contract

# KubeRay deletes a finished job's RayCluster this long after the job ends: its accelerators are
# billed until then and the next workload (say, the ModelServe of the adapter) waits for them. The
# outcome is kept elsewhere (status, manifest, progress ConfigMap, the submitter's logs).
TTL_SECONDS_AFTER_FINISHED = 30


def build_env(job: FineTuneJob, profile: AcceleratorProfile) -> list[dict[str, Any]]:
    """Operator variables, then Secret references (never values), then the user's plain env
    (names starting with TUNESERVE_ are reserved and dropped). Hardware facts (the visible-devices
    variable, torch device, Ray resource) travel in the config's ``accelerator``, not as env."""
    namespace, name = job.metadata.namespace, job.metadata.name
    env: list[dict[str, Any]] = [
        {"name": contract.CONFIG_ENV, "value": f"{CONFIG_DIR}/{CONFIG_FILE}"},
        {"name": contract.PROGRESS_CONFIGMAP_ENV, "value": f"{namespace}/{progress_configmap_name(name)}"},
    ]
    return with_user_env(env + credential_env(job.spec), job.spec)


def storage(job: FineTuneJob, profile: AcceleratorProfile, attempt: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) of every Ray pod: the config, shared memory, every claim the job's
    pvc:// URIs name (dataset and base model read-only, checkpoints and output read-write),
    and the catalog's host volumes."""
    spec = job.spec
    claims, claim_mounts = pvc_volumes([spec.dataset.uri, spec.base_model.location()],
                                       [spec.effective_checkpoint().uri, spec.output.uri])
    hosts, host_mounts = host_volumes(profile)
    volumes = [
        {"name": "tuneserve-config", "configMap": {"name": config_configmap_name(job.metadata.name, attempt)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts = [
        {"name": "tuneserve-config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    return volumes + claims + hosts, mounts + claim_mounts + host_mounts


def build_rayjob(job: FineTuneJob, candidate: Candidate, pool: Optional[str], attempt: int,
                 catalog: Catalog) -> dict[str, Any]:
    """RayJob (ray.io/v1, K8sJobMode) with a CPU-only head and one worker group of
    ``candidate.workers`` pods, each requesting ``devices_per_worker`` devices."""
    profile = candidate.profile
    image = image_for(job.spec, profile, profile.images.train)
    env = build_env(job, profile)
    pod_labels = labels(job, attempt)
    user_selector = dict(job.spec.node_selector or {})

    volumes, mounts = storage(job, profile, attempt)
    head_container = ray_container("ray-head", image, env, dict(catalog.defaults.head), mounts, drain=True)
    worker_container = ray_container("ray-worker", image, env,
                                     profile.worker_resources(candidate.devices_per_worker), mounts, drain=True)
    worker_selector = worker_node_selector(profile, user_selector, pool)

    name = rayjob_name(job.metadata.name, attempt)
    submitter = submitter_pod_template(profile, image, pod_labels, job.spec)
    return plain_tree({
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
            **({"submitterPodTemplate": submitter} if submitter else {}),
            "rayClusterSpec": {
                "rayVersion": RAY_VERSION,
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                    "template": {
                        "metadata": {"labels": pod_labels},
                        "spec": pod_spec(job.spec, profile, pod_service_account(job), head_container, volumes, user_selector, None, on_accelerator=False,
                                         grace_s=TRAIN_TERMINATION_GRACE_S),
                    },
                },
                "workerGroupSpecs": [{
                    "groupName": dns_label(f"{profile.vendor}-{profile.product}"),
                    "replicas": candidate.workers,
                    "minReplicas": candidate.workers,
                    "maxReplicas": candidate.workers,
                    "rayStartParams": ray_start_resources(profile, candidate.devices_per_worker),
                    "template": {
                        "metadata": {"labels": pod_labels},
                        "spec": pod_spec(job.spec, profile, pod_service_account(job), worker_container, volumes, worker_selector, node_affinity(profile),
                                         grace_s=TRAIN_TERMINATION_GRACE_S),
                    },
                }],
            },
        },
    })
