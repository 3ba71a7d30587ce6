"""The KubeRay RayService (ray.io/v1) that serves a ModelServe.

Shape: a CPU-only head (Serve controller and an HTTP proxy) and one worker group whose pods each
hold one replica's tensorParallelSize devices; Ray Serve autoscales replicas between
replicas.min and replicas.max and the in-tree autoscaler adds worker pods to match.

What changes what (the design's point):
* adapters -> only ConfigMap ``<ms>-adapters``, which the replicas read through the API every
  few seconds (the mounted copy, refreshed by kubelet, is the fallback). The RayService,
  serveConfigV2 included, does not depend on adapters: no redeploy, no restart.
* replicas -> serveConfigV2 ``autoscaling_config`` (a lightweight Serve update: no restart) and the
  worker group's min/max. KubeRay leaves worker-group replicas, minReplicas and maxReplicas out of
  its cluster hash: no new cluster, but the RayCluster it already made keeps the old bounds. So
  the operator patches the RayClusters the RayService's status names (active, and pending during
  an upgrade) with ``raycluster_scaling_patch`` (planned in modelserve/reconcile.py); their
  ``replicas`` stays the autoscaler's unless it falls outside the new bounds.
* base model / engine / accelerator -> rayClusterConfig and the app args: KubeRay prepares a new
  cluster (``upgradeStrategy: NewCluster``) and switches the Service over once it serves.

The endpoint Service is KubeRay's own serve Service, named ``<ms>-openai`` through
``spec.serveService``: KubeRay points its selector at the *active* cluster's serving pods
(``ray.io/cluster`` + ``ray.io/serve: "true"``) and moves it only when a new cluster's
application is RUNNING. A Service rendered by the operator selecting ``ray.io/serve`` alone would
send traffic to a half-started new cluster during an upgrade.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence

import yaml

from tuneserve.api.modelserve import Ingress, ModelServe
from tuneserve.builders.common import (
    CHOICE_ANNOTATION, adapters_configmap_name, dns_label, labels, object_meta, openai_service_name,
    rayservice_name, serve_status_configmap_name,
)
from tuneserve.builders.raycluster import (
    RAY_VERSION, credential_env, host_volumes, image_for, node_affinity, plain_tree, pod_spec, pvc_volumes,
    ray_container, ray_start_resources, with_user_env, worker_node_selector,
)
from tuneserve.modelserve.builders.rbac import serve_pod_service_account
from tuneserve.modelserve.builders.serve import build_serve_app_config
from tuneserve.core.catalog import AcceleratorProfile, Catalog
from tuneserve.core.scheduling.fit import Candidate
from tuneserve_workers import contract

ADAPTERS_VOLUME = "tuneserve-adapters"
# Ray's default ports, declared so KubeRay's head and serve Services expose exactly these.
SERVE_PORT = {"name": "serve", "containerPort": contract.SERVE_PORT}
HEAD_PORTS = [
    {"name": "gcs-server", "containerPort": 6379},
    {"name": "dashboard", "containerPort": 8265},
    {"name": "client", "containerPort": 10001},
    SERVE_PORT,
]
AUTOSCALER_IDLE_TIMEOUT_SECONDS = 300


def ingress_env(ingress: Ingress) -> list[dict[str, Any]]:
    """Ray Serve settings for ``spec.ingress`` (read by the controller on the head and by the
    replicas, so every container gets them).

    Direct: Ray Serve's throughput-optimized mode (a proxy on the head only, which the RayService
    keeps out of the endpoint Service); the ingress replica itself
    listens on a port from [MIN, MAX) (Ray 2.60), pinned here to the serve port, which is what
    KubeRay's Service targets and its worker readiness probe (``/-/healthz`` on 8000) checks: the
    replica answers that route, so a pod joins the endpoints once its replica serves. One replica
    per pod (it holds the pod's devices), so one port suffices; a replica restarting on the same
    pod waits for Ray's port drain (about 30 s). bench/serve_overhead.py (direct by default)
    measured this mode within 2% of bare vLLM on an H100, the proxy path 8-11% slower."""
    if ingress is not Ingress.Direct:
        return []
    return [
        {"name": "RAY_SERVE_THROUGHPUT_OPTIMIZED", "value": "1"},
        {"name": "RAY_SERVE_DIRECT_INGRESS_MIN_HTTP_PORT", "value": str(contract.SERVE_PORT)},
        {"name": "RAY_SERVE_DIRECT_INGRESS_MAX_HTTP_PORT", "value": str(contract.SERVE_PORT + 1)},
    ]


def build_serve_env(serve: ModelServe, profile: AcceleratorProfile) -> list[dict[str, Any]]:
    """Operator variables, the catalog's serving env, Secret references (never values), then
    the user's plain env (TUNESERVE_* reserved). The ModelServe's name, the vLLM device and plugin
    travel in the ServeAppConfig (serveConfigV2 args), not as env; Ray sets the visible-devices
    variable of each replica actor from its resources itself."""
    ns, name = serve.metadata.namespace, serve.metadata.name
    env: list[dict[str, Any]] = [
        {"name": contract.ADAPTERS_FILE_ENV, "value": contract.ADAPTERS_FILE},
        {"name": contract.SERVE_STATUS_CONFIGMAP_ENV, "value": f"{ns}/{serve_status_configmap_name(name)}"},
        # The engine's front end and core talk over loopback inside the pod (serve/__init__.py).
        {"name": "VLLM_HOST_IP", "value": "127.0.0.1"},
    ]
    if profile.vllm_plugins():
        env.append({"name": "VLLM_PLUGINS", "value": profile.vllm_plugins()})   # exactly the vendor's plugins
    env += ingress_env(serve.spec.ingress)
    env += [{"name": k, "value": v} for k, v in sorted(profile.serve_env.items())]
    return with_user_env(env + credential_env(serve.spec), serve.spec)


def storage(serve: ModelServe, profile: AcceleratorProfile,
            adapter_uris: Sequence[str]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(volumes, mounts) of every Ray pod: the adapters ConfigMap (no subPath: kubelet refreshes
    only whole ConfigMap volumes in place), shared memory, every claim the base model's and the
    adapters' pvc:// URIs name (read-only), and the catalog's host volumes. A pod cannot gain a
    volume: an adapter on a claim no pod mounts yet rolls out a new cluster; adapters on claims
    already mounted apply in place like any other."""
    claims, claim_mounts = pvc_volumes([serve.spec.base_model.location(), *adapter_uris], [])
    hosts, host_mounts = host_volumes(profile)
    volumes = [
        {"name": ADAPTERS_VOLUME, "configMap": {"name": adapters_configmap_name(serve.metadata.name)}},
        {"name": "dshm", "emptyDir": {"medium": "Memory"}},
    ]
    mounts = [
        {"name": ADAPTERS_VOLUME, "mountPath": contract.ADAPTERS_DIR, "readOnly": True},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    return volumes + claims + hosts, mounts + claim_mounts + host_mounts


def autoscaler_options(profile: AcceleratorProfile) -> dict[str, Any]:
    """KubeRay's autoscaler sidecar runs the head image's `ray` but gets none of the head
    container's mounts: an image taking its Python from the node (catalog podVolumes) needs
    them here too, or the sidecar exits with "ray: command not found" (seen on the real node)."""
    options: dict[str, Any] = {"idleTimeoutSeconds": AUTOSCALER_IDLE_TIMEOUT_SECONDS}
    _, mounts = host_volumes(profile)
    if mounts:
        options["volumeMounts"] = mounts
    return options


def build_serve_config_v2(serve: ModelServe, candidate: Candidate) -> str:
    """serveConfigV2: one application, the ServeAppConfig as args, the deployment's autoscaling
    and per-replica resources. Deterministic YAML (sorted keys)."""
    replicas = serve.spec.replicas
    args = build_serve_app_config(serve, candidate)
    app = {
        "name": contract.SERVE_APP_NAME,
        "route_prefix": "/",
        "import_path": contract.SERVE_IMPORT_PATH,
        "args": args.model_dump(mode="json"),
        "deployments": [{
            "name": contract.SERVE_DEPLOYMENT_NAME,
            "autoscaling_config": {
                "min_replicas": replicas.min,
                "max_replicas": replicas.max,
                "target_ongoing_requests": replicas.target_ongoing_requests,
            },
            # One replica actor holds all of its devices (tensor parallelism inside the replica).
            "ray_actor_options": contract.replica_actor_options(args),
        }],
    }
    return yaml.safe_dump({"applications": [app]}, sort_keys=True, width=120)


def worker_group_name(profile: AcceleratorProfile) -> str:
    return dns_label(f"{profile.vendor}-{profile.product}")


def build_rayservice(serve: ModelServe, candidate: Candidate, pool: Optional[str], catalog: Catalog,
                     adapter_uris: Sequence[str] = ()) -> dict[str, Any]:
    """RayService with a CPU-only head and one worker group of replicas.min..replicas.max pods,
    each with ``candidate.devices_per_worker`` (= tensorParallelSize) devices. ``adapter_uris``:
    the desired adapters' URIs, for the claims their pvc:// URIs name."""
    spec, profile = serve.spec, candidate.profile
    name = serve.metadata.name
    image = image_for(spec, profile, profile.images.serve)
    env = build_serve_env(serve, profile)
    pod_labels = labels(serve)
    account = serve_pod_service_account(serve)
    user_selector = dict(spec.node_selector or {})

    volumes, mounts = storage(serve, profile, [*adapter_uris, *(a.uri for a in spec.adapters if a.uri)])
    head_container = ray_container("ray-head", image, env, dict(catalog.defaults.head), mounts, HEAD_PORTS)
    worker_container = ray_container("ray-worker", image, env,
                                     profile.worker_resources(candidate.devices_per_worker), mounts, [SERVE_PORT])
    worker_selector = worker_node_selector(profile, user_selector, pool)

    return plain_tree({
        "apiVersion": "ray.io/v1",
        "kind": "RayService",
        "metadata": object_meta(serve, rayservice_name(name), annotations={CHOICE_ANNOTATION: candidate.key}),
        "spec": {
            "upgradeStrategy": {"type": "NewCluster"},
            # Direct ingress still runs a Serve proxy on the head (Ray 2.60: "proxy on head node
            # only"); keep the head out of the Service so every request goes straight to a replica.
            "excludeHeadPodFromServeSvc": spec.ingress is Ingress.Direct,
            "serveService": {
                "metadata": {"name": openai_service_name(name), "labels": pod_labels},
                "spec": {"ports": [{"name": "serve", "port": contract.SERVE_PORT}]},
            },
            "serveConfigV2": build_serve_config_v2(serve, candidate),
            "rayClusterConfig": {
                "rayVersion": RAY_VERSION,
                "enableInTreeAutoscaling": True,
                "autoscalerOptions": autoscaler_options(profile),
                "headGroupSpec": {
                    "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0"},
                    "template": {
                        "metadata": {"labels": pod_labels},
                        "spec": pod_spec(spec, profile, account, head_container, volumes, user_selector, None, on_accelerator=False),
                    },
                },
                "workerGroupSpecs": [{
                    "groupName": worker_group_name(profile),
                    "replicas": spec.replicas.min,
                    "minReplicas": spec.replicas.min,
                    "maxReplicas": spec.replicas.max,
                    "rayStartParams": ray_start_resources(profile, candidate.devices_per_worker),
                    "template": {
                        "metadata": {"labels": pod_labels},
                        "spec": pod_spec(spec, profile, account, worker_container, volumes, worker_selector, node_affinity(profile)),
                    },
                }],
            },
        },
    })


def raycluster_scaling_patch(serve: ModelServe, live_raycluster: Mapping[str, Any]) -> Optional[list[dict[str, Any]]]:
    """JSON patch that gives the live RayCluster's worker group replicas.min/max, or None when it
    has them already (or has no worker group). KubeRay does not carry worker-group bounds from the
    RayService to a cluster it already created.

    ``replicas`` belongs to the autoscaler: it is left alone unless it lies outside the new bounds,
    and then clamped into them. Every value the patch is computed from is guarded by a ``test`` op,
    so a patch made from a stale copy of the cluster fails instead of overwriting a newer write
    (the autoscaler's, say); the next reconcile computes it again from the fresh object."""
    groups = (live_raycluster.get("spec") or {}).get("workerGroupSpecs") or []
    if not groups:
        return None
    group, base = groups[0], "/spec/workerGroupSpecs/0"
    low, high = serve.spec.replicas.min, serve.spec.replicas.max
    want = {"minReplicas": low, "maxReplicas": high}
    current = group.get("replicas")
    if current is not None and not low <= current <= high:
        want["replicas"] = min(high, max(low, current))
    changed = {key: value for key, value in want.items() if group.get(key) != value}
    if not changed:
        return None
    tests = [{"op": "test", "path": f"{base}/groupName", "value": group.get("groupName")}]
    tests += [{"op": "test", "path": f"{base}/{key}", "value": group[key]} for key in changed if key in group]
    ops = [{"op": "replace" if key in group else "add", "path": f"{base}/{key}", "value": value}
           for key, value in changed.items()]
    return tests + ops
