"""Stages shared by the real-node modules (test_real_story.py, test_real_faults.py): the images
built here and imported into the node, MinIO with the story's model and data, the operator
installed by Helm, and the module's namespace (``NS`` of the module) with the object-store Secret.

Module-scoped, so a failure names the stage that broke and each module cleans up after itself.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from kube import wait_for
from localcluster import BIN

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "hack"))
import images as image_builds  # noqa: E402
import realstory as story  # noqa: E402
from minio_server import MinioServer  # noqa: E402


@pytest.fixture(scope="module")
def real_images(cluster) -> dict:
    """Built (cached by content) and imported into the real node's containerd."""
    built = image_builds.build_all()
    for tar in story.image_tars(built):
        cluster.import_image(tar)
    return built


@pytest.fixture(scope="module")
def storage(cluster, tmp_path_factory):
    """MinIO on the pod bridge (pods reach it, nothing outside does), with the tiny model and a
    dataset that teaches the adapter its answer."""
    work = tmp_path_factory.mktemp("real-story")
    server = MinioServer(work / "minio", host=cluster.real_node.bridge_ip, bucket="story").start()
    try:
        yield server, story.upload_story_data(server, work)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def operator_values(real_images) -> dict:
    """The chart values the module installs (a module overrides this fixture to change them)."""
    return story.build_operator_values(real_images)


@pytest.fixture(scope="module")
def helm_operator(cluster, kube, operator_values, no_session_operator_module, tmp_path_factory):
    """The chart installed with the images built here, its two operator pods on the real node."""
    values = operator_values
    story.install_operator(BIN / "helm", cluster.kubeconfig, values, tmp_path_factory.mktemp("helm"))
    try:
        yield values
    finally:
        story.uninstall_operator(BIN / "helm", cluster.kubeconfig)
        gone(kube, story.RELEASE_NAMESPACE)


@pytest.fixture(scope="module")
def story_namespace(kube, storage, request):
    """The module's namespace (its ``NS``) with the object-store Secret; its pods gone after."""
    server, _ = storage
    ns = request.module.NS
    kube.core.create_namespace({"metadata": {"name": ns}})
    kube.apply(story.build_object_store_secret(ns, server.access_key, server.secret_key))
    wait_for(lambda: kube.get("v1", "ServiceAccount", "default", ns), 60, "the default ServiceAccount")
    yield ns
    gone(kube, ns)


def gone(kube, namespace: str, timeout: float = 240) -> None:
    """Delete a namespace and wait until it no longer exists: the next module's install into a
    namespace of that name is refused while it is still terminating."""
    kube.core.delete_namespace(namespace)
    wait_for(lambda: kube.get("v1", "Namespace", namespace) is None, timeout, f"namespace {namespace} to be gone")
