"""Pieces of a Ray cluster spec shared by the RayJob (training) and RayService (serving)
builders: env from Secret references, pod spec, node affinity, Ray start resources, and the
head/worker container shape. Vendor differences come from the catalog profile only.
"""
from __future__ import annotations

import json
from typing import Any, Optional

from tuneserve.api.common import RESERVED_ENV_PREFIX  # also refused at admission; dropped here as well
from tuneserve.api.workload import RayPodOptions
from tuneserve.core.catalog import AcceleratorProfile
from tuneserve.core.scheduling.inventory import DEFAULT_POOL, POOL_LABEL
from tuneserve.core.scheduling.fit import pod_tolerations, user_tolerations
from tuneserve_workers import contract

RAY_VERSION = "2.60.0"

TRAIN_TERMINATION_GRACE_S = 300
"""Grace period of the training pods: SIGTERM (pod deletion, node drain) lets the step in flight
finish and commits an emergency checkpoint (workers' drain.py): a step of the largest catalog
bases takes up to about a minute, the checkpoint (LoRA adapter + its optimizer state, tens to
hundreds of MB) another minute or two to an object store; 300 s leaves margin. Kubernetes' default
30 s would cut the upload. A spot reclaim gives less (the cloud's notice, kubelet's node shutdown
grace): there the drain helps only as far as that notice lasts."""

DRAIN_PRE_STOP = (
    'd="${TUNESERVE_DRAIN_DIR:-/tmp/tuneserve-drain}"; '
    'for f in "$d"/*; do [ -e "$f" ] && kill -TERM "${f##*/}" 2>/dev/null || rm -f "$f"; done; '
    'while :; do left=0; for f in "$d"/*; do [ -e "$f" ] || continue; '
    'if kill -0 "${f##*/}" 2>/dev/null; then left=1; else rm -f "$f"; fi; done; '
    '[ "$left" = 0 ] && break; sleep 1; done; '
    'ray stop --force >/dev/null 2>&1; exit 0')
"""preStop of the training containers: the pod's SIGTERM reaches only PID 1 (``ray start``), which
does not pass it on and whose exit kills the training processes. This signals each training process
registered in the drain directory, then waits (within the grace period) until each has committed
its checkpoint and unregistered, or is gone. Then it stops Ray in the container, so ``ray start``
(PID 1, which ignores SIGTERM) exits: else the pod, and the devices it holds, stayed until the end
of the 300 s grace period after every drain (seen on the real node: a retry's pods Pending 4.5 min)."""

CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
"""What holds for every Ray container. No runAsNonRoot/runAsUser: the worker images run as root
(images/*.Containerfile have no USER; the local CPU image mounts a venv under /root by hostPath),
so a non-root uid needs image changes and a real-node run first."""
POD_SECURITY = {"seccompProfile": {"type": "RuntimeDefault"}}


def secret_env(name: str, ref: Any) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}


def credential_env(spec: RayPodOptions) -> list[dict[str, Any]]:
    """Secret references (never values) for the model hub and the object store."""
    env: list[dict[str, Any]] = []
    creds = spec.credentials
    if not creds:
        return env
    if creds.hugging_face_token:
        env.append(secret_env("HF_TOKEN", creds.hugging_face_token))
    store = creds.object_store
    if store:
        env.append(secret_env("AWS_ACCESS_KEY_ID", store.access_key_id))
        env.append(secret_env("AWS_SECRET_ACCESS_KEY", store.secret_access_key))
        if store.session_token:
            env.append(secret_env("AWS_SESSION_TOKEN", store.session_token))
        if store.endpoint_url:
            env.append({"name": "AWS_ENDPOINT_URL", "value": store.endpoint_url})
        if store.region:
            env.append({"name": "AWS_DEFAULT_REGION", "value": store.region})
    for item in creds.secret_env or []:
        env.append(secret_env(item.name, item.secret_key_ref))
    return env


def with_user_env(env: list[dict[str, Any]], spec: RayPodOptions) -> list[dict[str, Any]]:
    """``env`` then the user's plain env; names starting with TUNESERVE_ and names already set
    are dropped (the operator's variables win)."""
    taken = {e["name"] for e in env}
    return env + [{"name": e.name, "value": e.value} for e in spec.env or []
                  if not e.name.startswith(RESERVED_ENV_PREFIX) and e.name not in taken]


def node_affinity(profile: AcceleratorProfile) -> Optional[dict[str, Any]]:
    if not profile.node_labels_any_of:
        return None
    expressions = [{"key": k, "operator": "In", "values": list(v)} for k, v in sorted(profile.node_labels_any_of.items())]
    return {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": expressions}]}}}


def pod_spec(spec: RayPodOptions, profile: AcceleratorProfile, service_account: str, container: dict[str, Any],
             volumes: list[dict[str, Any]], node_selector: dict[str, str],
             affinity: Optional[dict[str, Any]], *, on_accelerator: bool = True,
             grace_s: Optional[int] = None) -> dict[str, Any]:
    """A Ray pod. Only pods that use the accelerator tolerate its taint: the head (no devices)
    stays off the accelerator nodes, keeping their CPU and memory for the workers. ``grace_s``:
    its terminationGracePeriodSeconds (training pods: TRAIN_TERMINATION_GRACE_S)."""
    tolerations = pod_tolerations(profile, spec) if on_accelerator else [dict(t) for t in user_tolerations(spec)]
    out: dict[str, Any] = {
        "serviceAccountName": service_account,
        "containers": [container],
        "volumes": volumes,
        "tolerations": tolerations,
        "securityContext": dict(POD_SECURITY),
    }
    if grace_s is not None:
        out["terminationGracePeriodSeconds"] = grace_s
    if node_selector:
        out["nodeSelector"] = dict(sorted(node_selector.items()))
    if affinity:
        out["affinity"] = affinity
    if spec.priority_class_name:
        out["priorityClassName"] = spec.priority_class_name
    return out


def ray_start_resources(profile: AcceleratorProfile, devices: int) -> dict[str, str]:
    """KubeRay turns limits ending in "gpu" into num-gpus itself; other accelerators need
    `--resources` in the form KubeRay passes through verbatim: "{\\"NPU\\": 8}" (quoted JSON)."""
    if not profile.ray_resource or profile.ray_resource_auto_mapped:
        return {}
    payload = json.dumps({profile.ray_resource: devices * profile.ray_resources_per_device}).replace('"', '\\"')
    return {"resources": f'"{payload}"'}


def plain_tree(obj: dict[str, Any]) -> dict[str, Any]:
    """A JSON round trip: pod specs share env/labels/mounts while building; callers get a plain
    tree with no shared sub-objects (deepcopy would keep the sharing)."""
    return json.loads(json.dumps(obj))


def image_for(spec: RayPodOptions, profile: AcceleratorProfile, default: str) -> str:
    return (spec.image_overrides or {}).get(profile.vendor) or default


def ray_container(name: str, image: str, env: list[dict[str, Any]], resources: dict[str, str],
                  mounts: list[dict[str, Any]], ports: Optional[list[dict[str, Any]]] = None, *,
                  drain: bool = False) -> dict[str, Any]:
    """A Ray head or worker container: requests equal limits (extended resources need it).
    ``drain``: training containers, whose preStop drains the training processes (DRAIN_PRE_STOP)."""
    container: dict[str, Any] = {"name": name, "image": image, "env": env}
    if ports:
        container["ports"] = ports
    container["resources"] = {"requests": resources, "limits": resources}
    container["volumeMounts"] = mounts
    container["securityContext"] = plain_tree(CONTAINER_SECURITY)
    if drain:
        container["lifecycle"] = {"preStop": {"exec": {"command": ["/bin/sh", "-c", DRAIN_PRE_STOP]}}}
    return container


def worker_node_selector(profile: AcceleratorProfile, user_selector: dict[str, str], pool: Optional[str]) -> dict[str, str]:
    """The accelerator's labels, the user's, and the chosen pool (when the fleet names pools)."""
    selector = {**profile.node_labels, **user_selector}
    if pool and pool != DEFAULT_POOL:
        selector[POOL_LABEL] = pool
    return selector


def pvc_volumes(read: list[str], written: list[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) for every PersistentVolumeClaim the URIs name, at the path the workers
    resolve pvc:// URIs to (``contract.PVC_ROOT/<claim>``); read-only unless a written URI names
    it. Volume names are by position in claim order: claim names may hold dots, volume names not."""
    claims: dict[str, bool] = {}
    for uri, read_only in [(u, True) for u in read] + [(u, False) for u in written]:
        claim = contract.pvc_claim(uri)
        if claim:
            claims[claim] = claims.get(claim, True) and read_only
    volumes, mounts = [], []
    for index, (claim, read_only) in enumerate(sorted(claims.items())):
        name = f"tuneserve-pvc-{index}"
        volumes.append({"name": name, "persistentVolumeClaim": {"claimName": claim, "readOnly": read_only}})
        mounts.append({"name": name, "mountPath": f"{contract.PVC_ROOT}/{claim}", "readOnly": read_only})
    return volumes, mounts


def host_volumes(profile: AcceleratorProfile) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) of the catalog's ``podVolumes`` for this profile."""
    volumes = [{"name": v.name, "hostPath": {"path": v.host_path}} for v in profile.pod_volumes]
    mounts = [{"name": v.name, "mountPath": v.mount_path, "readOnly": v.read_only} for v in profile.pod_volumes]
    return volumes, mounts


SUBMITTER_RESOURCES = {"requests": {"cpu": "500m", "memory": "200Mi"}, "limits": {"cpu": "1", "memory": "1Gi"}}


def submitter_pod_template(profile: AcceleratorProfile, image: str, labels: dict[str, str],
                           spec: RayPodOptions) -> Optional[dict[str, Any]]:
    """KubeRay's default submitter (head image, KubeRay's resources) plus the profile's host
    volumes, or None where the profile has none: a submitter whose image takes its Python from
    the node needs them too, so it also goes where the head goes (the user's node selector and
    tolerations): elsewhere those host directories do not exist. KubeRay fills in the command
    and the dashboard address."""
    volumes, mounts = host_volumes(profile)
    if not volumes:
        return None
    container = {"name": "ray-job-submitter", "image": image, "resources": SUBMITTER_RESOURCES, "volumeMounts": mounts}
    pod: dict[str, Any] = {"restartPolicy": "Never", "containers": [container], "volumes": volumes,
                           "tolerations": [dict(t) for t in user_tolerations(spec)]}
    if spec.node_selector:
        pod["nodeSelector"] = dict(sorted(spec.node_selector.items()))
    return {"metadata": {"labels": labels}, "spec": pod}
