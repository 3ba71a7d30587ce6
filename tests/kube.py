"""Test helpers over the real API server: apply YAML, read objects, wait on conditions."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Union

import yaml
from kubernetes import client, config, dynamic
from kubernetes.client.exceptions import ApiException

import waiting

FIELD_MANAGER = "tuneserve-tests"


def wait_for(fn: Callable[[], Any], timeout: float, what: str, interval: float = 0.25) -> Any:
    """``waiting.wait_for`` where an API error (e.g. 404 before the object exists) means "not yet"."""
    return waiting.wait_for(fn, timeout, what, interval, retry=(ApiException,))


def condition(obj: dict, ctype: str) -> Optional[dict]:
    return next((c for c in (obj.get("status") or {}).get("conditions") or [] if c.get("type") == ctype), None)


class Kube:
    def __init__(self, kubeconfig: Path):
        self.api_client = config.new_client_from_config(config_file=str(kubeconfig))
        self.dyn = dynamic.DynamicClient(self.api_client)
        self.core = client.CoreV1Api(self.api_client)

    def resource(self, api_version: str, kind: str):
        return self.dyn.resources.get(api_version=api_version, kind=kind)

    def apply(self, objs: Union[dict, str, Iterable[dict]], namespace: Optional[str] = None) -> list[dict]:
        """Server-side apply of one object, a list, or a multi-document YAML string."""
        if isinstance(objs, str):
            objs = [d for d in yaml.safe_load_all(objs) if d]
        elif isinstance(objs, dict):
            objs = [objs]
        out = []
        for obj in objs:
            res = self.resource(obj["apiVersion"], obj["kind"])
            ns = obj["metadata"].get("namespace") or (namespace if res.namespaced else None)
            if ns:
                obj = {**obj, "metadata": {**obj["metadata"], "namespace": ns}}
            applied = res.server_side_apply(body=obj, name=obj["metadata"]["name"], namespace=ns,
                                            field_manager=FIELD_MANAGER, force_conflicts=True)
            out.append(applied.to_dict())
        return out

    def get(self, api_version: str, kind: str, name: str, namespace: Optional[str] = None) -> Optional[dict]:
        try:
            return self.resource(api_version, kind).get(name=name, namespace=namespace).to_dict()
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, api_version: str, kind: str, namespace: Optional[str] = None, **kw) -> list[dict]:
        return self.resource(api_version, kind).get(namespace=namespace, **kw).to_dict()["items"]

    def delete(self, api_version: str, kind: str, name: str, namespace: Optional[str] = None,
               propagation: str = "Background") -> None:
        try:
            self.resource(api_version, kind).delete(name=name, namespace=namespace,
                                                    body={"propagationPolicy": propagation})
        except ApiException as exc:
            if exc.status != 404:
                raise

    def events_for(self, namespace: str, name: str) -> list[dict]:
        return [e for e in self.list("v1", "Event", namespace)
                if (e.get("involvedObject") or {}).get("name") == name]
