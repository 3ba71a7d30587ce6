"""A stand-in for the Ray dashboard's job API, for clusters whose pods are simulated by kwok.

KubeRay asks the head's dashboard (``http://<cluster>-head-svc.<ns>.svc.cluster.local:8265``) how a
RayJob's Ray job is doing. kwok pods run nothing, so the local control plane starts the KubeRay
operator with ``HTTP_PROXY`` pointing here: every dashboard request arrives as a proxy request
(absolute-form URL), and this server answers it from a table that tests control.

It also answers Ray Serve's REST API the way a healthy head would: what KubeRay PUTs to
/api/serve/applications/ is reported back as RUNNING with HEALTHY deployments.

Control API (plain requests to this server, not proxied):
  PUT  /_control/jobs/<job_id>   {"status": "SUCCEEDED"|"FAILED"|"RUNNING"|..., "message": "..."}
  GET  /_control/jobs            the table, plus which jobs KubeRay asked about
  PUT  /_control/default         {"status": "RUNNING"}: what unknown jobs report

A real ``ray job submit`` (KubeRay's submitter pod) exits when the Ray job ends. The submitter pods
are simulated too and kwok leaves them running, so when a job reaches a terminal status here this
server finishes its submitter pod through the Kubernetes API, as the real one would.

Heads that really run (pods on the real node of hack/realnode.py, i.e. on a node without the
kwok.x-k8s.io/node=fake annotation) get their requests forwarded, unchanged and streamed, to the
Service's ClusterIP (host -> bridge -> kube-proxy), so their real dashboard, job API and Serve
REST API answer KubeRay; simulated heads keep the stand-in's answers.
"""
from __future__ import annotations

import argparse
import http.client
import json
import re
import ssl
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

TERMINAL = {"SUCCEEDED", "FAILED", "STOPPED"}
SUBMITTER_CONTAINER = "ray-job-submitter"
_SERVICE_HOST = re.compile(r"^(?P<svc>[a-z0-9-]+)\.(?P<ns>[a-z0-9-]+)\.svc(\.[a-z0-9.-]+)?$")
_HOP_HEADERS = {"connection", "keep-alive", "proxy-connection", "proxy-authorization", "te", "trailer",
                "transfer-encoding", "upgrade"}
_JOB_PATH = re.compile(r"^/api/jobs/(?P<id>[^/]+)/?(?P<rest>stop|logs)?/?$")


class KubeAPI:
    """Just enough of the Kubernetes API (token auth over HTTPS) to finish submitter pods."""

    def __init__(self, kubeconfig: Path):
        cfg = yaml.safe_load(kubeconfig.read_text())
        cluster = cfg["clusters"][0]["cluster"]
        self.server = cluster["server"]
        self.token = cfg["users"][0]["user"]["token"]
        self.ctx = ssl.create_default_context(cafile=cluster["certificate-authority"])

    def request(self, method: str, path: str, body: dict | None = None, content_type: str = "application/json"):
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.server + path, data=data, method=method)
        req.add_header("Authorization", f"Bearer {self.token}")
        if data is not None:
            req.add_header("Content-Type", content_type)
        with urllib.request.urlopen(req, context=self.ctx, timeout=10) as resp:
            return json.loads(resp.read() or b"{}")

    def finish_submitter(self, job_id: str, status: str) -> bool:
        """Marks the submitter pod(s) of the RayJob running ``job_id`` as exited; True when done."""
        rayjobs = self.request("GET", "/apis/ray.io/v1/rayjobs")["items"]
        owner = next((rj for rj in rayjobs if rj.get("status", {}).get("jobId") == job_id), None)
        if owner is None:
            return False
        ns, name = owner["metadata"]["namespace"], owner["metadata"]["name"]
        selector = urllib.parse.quote(f"batch.kubernetes.io/job-name={name}")
        pods = self.request("GET", f"/api/v1/namespaces/{ns}/pods?labelSelector={selector}")["items"]
        running = [p for p in pods if p.get("status", {}).get("phase") == "Running"]
        if not running:
            return False
        now = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
        for pod in running:
            statuses = []
            for c in pod["spec"]["containers"]:
                statuses.append({
                    "name": c["name"], "image": c["image"], "imageID": "", "ready": False,
                    "restartCount": 0, "started": False,
                    "state": {"terminated": {"exitCode": 0, "reason": "Completed",
                                             "startedAt": pod["status"].get("startTime", now),
                                             "finishedAt": now,
                                             "message": f"ray job {job_id} {status}"}},
                })
            patch = {"status": {"phase": "Succeeded", "containerStatuses": statuses,
                                "conditions": [{"type": "Ready", "status": "False", "reason": "PodCompleted"}]}}
            self.request("PATCH", f"/api/v1/namespaces/{ns}/pods/{pod['metadata']['name']}/status",
                         patch, "application/strategic-merge-patch+json")
        return True


class RealHeads:
    """Which proxied hosts are Services backed by pods that really run, and their ClusterIP;
    answers are cached briefly since KubeRay polls every head every few seconds."""

    def __init__(self, kube: KubeAPI | None, ttl: float = 3.0):
        self.kube, self.ttl = kube, ttl
        self.cache: dict[str, tuple[float, str | None]] = {}
        self.lock = threading.Lock()

    def target(self, host: str) -> str | None:
        """``clusterIP`` for a real head's Service host name, else None (stand-in answers)."""
        name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
        m = _SERVICE_HOST.match(name)
        if not m or self.kube is None:
            return None
        with self.lock:
            hit = self.cache.get(name)
        if hit and time.monotonic() - hit[0] < self.ttl:
            return hit[1]
        try:
            ip = self._lookup(m.group("ns"), m.group("svc"))
        except (urllib.error.URLError, OSError, KeyError, ValueError):
            ip = None
        with self.lock:
            self.cache[name] = (time.monotonic(), ip)
        return ip

    def _lookup(self, ns: str, svc: str) -> str | None:
        """The ClusterIP, or for a headless Service (KubeRay's head Services are headless) the IP
        of a selected pod on a real node, as cluster DNS would answer."""
        service = self.kube.request("GET", f"/api/v1/namespaces/{ns}/services/{svc}")
        selector = service["spec"].get("selector") or {}
        ip = service["spec"].get("clusterIP")
        if not selector or not ip:
            return None
        query = urllib.parse.quote(",".join(f"{k}={v}" for k, v in selector.items()))
        pods = self.kube.request("GET", f"/api/v1/namespaces/{ns}/pods?labelSelector={query}")["items"]
        real = [p for p in pods if p["spec"].get("nodeName") and self._node_is_real(p["spec"]["nodeName"])]
        if not real:
            return None
        if ip != "None":
            return ip
        return next((p["status"]["podIP"] for p in real if (p.get("status") or {}).get("podIP")), None)

    def _node_is_real(self, name: str) -> bool:
        node = self.kube.request("GET", f"/api/v1/nodes/{urllib.parse.quote(name)}")
        return (node["metadata"].get("annotations") or {}).get("kwok.x-k8s.io/node") != "fake"


def forward(handler: BaseHTTPRequestHandler, ip: str, port: int, path: str) -> None:
    """Relays one request to ``ip:port`` and its response back, bodies streamed in chunks."""
    conn = http.client.HTTPConnection(ip, port, timeout=60)
    try:
        conn.putrequest(handler.command, path or "/", skip_host=True, skip_accept_encoding=True)
        for key, value in handler.headers.items():
            if key.lower() not in _HOP_HEADERS:
                conn.putheader(key, value)
        chunked = "chunked" in (handler.headers.get("Transfer-Encoding") or "").lower()
        if chunked:
            conn.putheader("Transfer-Encoding", "chunked")
        conn.endheaders()
        _relay_request_body(handler, conn, chunked)
        resp = conn.getresponse()
    except OSError as exc:
        conn.close()
        handler.send_error(502, f"forwarding to {ip}:{port}: {exc}")
        return
    try:
        handler.send_response(resp.status, resp.reason)
        length = resp.getheader("Content-Length")
        for key, value in resp.getheaders():
            if key.lower() not in _HOP_HEADERS:
                handler.send_header(key, value)
        no_body = handler.command == "HEAD" or resp.status in (204, 304)
        if length is None and not no_body:
            handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        while not no_body:
            chunk = resp.read1(65536)
            if length is None:
                handler.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            elif chunk:
                handler.wfile.write(chunk)
            if not chunk:
                break
            handler.wfile.flush()
    finally:
        conn.close()


def _relay_request_body(handler: BaseHTTPRequestHandler, conn: http.client.HTTPConnection, chunked: bool) -> None:
    if chunked:
        while True:
            size = int(handler.rfile.readline().split(b";")[0].strip() or b"0", 16)
            data = handler.rfile.read(size + 2)[:size] if size else b""
            if not size:
                handler.rfile.readline()   # the empty line after the last chunk (no trailers)
                conn.send(b"0\r\n\r\n")
                return
            conn.send(b"%x\r\n%s\r\n" % (size, data))
    left = int(handler.headers.get("Content-Length") or 0)
    while left > 0:
        data = handler.rfile.read(min(left, 65536))
        if not data:
            return
        conn.send(data)
        left -= len(data)


class JobTable:
    def __init__(self, kube: KubeAPI | None, default_status: str):
        self.lock = threading.Lock()
        self.jobs: dict[str, dict] = {}
        self.asked: dict[str, str] = {}       # job id -> Host KubeRay asked (which cluster)
        self.serve_apps: dict[str, dict] = {}  # head host -> the Serve config KubeRay last PUT
        self.default_status = default_status
        self.kube = kube

    def info(self, job_id: str, host: str) -> dict:
        with self.lock:
            self.asked[job_id] = host
            job = self.jobs.get(job_id) or {"status": self.default_status, "message": ""}
        now_ms = int(time.time() * 1000)
        return {
            "job_id": job_id, "submission_id": job_id, "type": "SUBMISSION",
            "status": job["status"], "message": job.get("message", ""),
            "entrypoint": job.get("entrypoint", ""), "start_time": job.get("start_time", now_ms),
            "end_time": job.get("end_time", now_ms if job["status"] in TERMINAL else 0),
            "metadata": job.get("metadata", {}), "runtime_env": {}, "error_type": None,
            "driver_info": None,
        }

    def set(self, job_id: str, status: str, message: str = "", **extra) -> None:
        with self.lock:
            job = self.jobs.setdefault(job_id, {"start_time": int(time.time() * 1000)})
            job.update(extra, status=status, message=message)
            if status in TERMINAL:
                job["end_time"] = int(time.time() * 1000)
        if status in TERMINAL and self.kube is not None:
            threading.Thread(target=self._finish_submitter, args=(job_id, status), daemon=True).start()

    def _finish_submitter(self, job_id: str, status: str, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.kube.finish_submitter(job_id, status):
                    return
            except (urllib.error.URLError, OSError, KeyError) as exc:
                print(f"finishing submitter of {job_id}: {exc}", flush=True)
            time.sleep(0.5)   # polling the API for the submitter pod to appear
        print(f"gave up finishing the submitter of {job_id}", flush=True)

    def snapshot(self) -> dict:
        with self.lock:
            return {"jobs": dict(self.jobs), "asked": dict(self.asked), "default": self.default_status,
                    "serve": {host: [a.get("name") for a in cfg.get("applications", [])]
                              for host, cfg in self.serve_apps.items()}}

    def put_serve(self, host: str, config: dict) -> None:
        with self.lock:
            self.serve_apps[host.split(":")[0]] = config

    def serve_details(self, host: str) -> dict:
        """Ray Serve's declarative status: every application KubeRay deployed is RUNNING and its
        deployments HEALTHY (the pods are simulated; readiness of the real app is the serve
        worker's own tests' business)."""
        with self.lock:
            config = self.serve_apps.get(host.split(":")[0], {})
        apps = {}
        for app in config.get("applications", []):
            deployments = {d["name"]: {"name": d["name"], "status": "HEALTHY", "message": "",
                                       "replicas": [], "deployment_config": {}}
                           for d in app.get("deployments", [])}
            apps[app["name"]] = {"name": app["name"], "route_prefix": app.get("route_prefix", "/"),
                                 "status": "RUNNING", "message": "", "deployments": deployments,
                                 "last_deployed_time_s": time.time()}
        return {"applications": apps, "proxy_location": "EveryNode", "http_options": {}, "controller_info": {}}


def make_handler(table: JobTable, heads: RealHeads | None = None):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def parse_request(self) -> bool:
            """Proxy requests for real heads are forwarded whatever their method; the stand-in's
            own do_* methods only see the rest."""
            if not super().parse_request():
                return False
            url = urllib.parse.urlsplit(self.path)
            ip = heads.target(url.netloc) if heads is not None and url.netloc else None
            if ip is None:
                return True
            path = url.path + (f"?{url.query}" if url.query else "")
            forward(self, ip, url.port or 80, path)
            self.close_connection = True
            return False   # handled: BaseHTTPRequestHandler skips do_*

        def log_message(self, fmt, *args):  # one line per request in the component log
            print(f"{self.command} {self.path} -> {fmt % args}", flush=True)

        def _send(self, code: int, body) -> None:
            data = json.dumps(body).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _body(self) -> dict:
            n = int(self.headers.get("Content-Length") or 0)
            return json.loads(self.rfile.read(n) or b"{}") if n else {}

        def _route(self):
            url = urllib.parse.urlsplit(self.path)
            host = url.netloc or self.headers.get("Host", "")
            return host, url.path

        def do_GET(self):
            host, path = self._route()
            if path == "/_control/jobs":
                return self._send(200, table.snapshot())
            if path in ("/healthz", "/api/gcs_healthz", "/api/local_raylet_healthz"):
                return self._send(200, {"ok": True})
            if path == "/api/version":
                return self._send(200, {"version": "4", "ray_version": "2.60.0", "ray_commit": "stand-in"})
            m = _JOB_PATH.match(path)
            if m and not m.group("rest"):
                return self._send(200, table.info(m.group("id"), host))
            if m and m.group("rest") == "logs":
                return self._send(200, {"logs": ""})
            if path.rstrip("/") == "/api/serve/applications":
                return self._send(200, table.serve_details(host))
            return self._send(404, {"error": f"no route {path}"})

        def do_POST(self):
            host, path = self._route()
            body = self._body()
            if path.rstrip("/") == "/api/jobs":   # HTTPMode submission
                job_id = body.get("submission_id") or body.get("job_id") or f"raysubmit_{int(time.time()*1e6)}"
                table.set(job_id, table.default_status, entrypoint=body.get("entrypoint", ""),
                          metadata=body.get("metadata") or {})
                return self._send(200, {"job_id": job_id, "submission_id": job_id})
            m = _JOB_PATH.match(path)
            if m and m.group("rest") == "stop":
                table.set(m.group("id"), "STOPPED", "stopped through the API")
                return self._send(200, {"stopped": True})
            return self._send(404, {"error": f"no route {path}"})

        def do_PUT(self):
            host, path = self._route()
            body = self._body()
            if path.startswith("/_control/jobs/"):
                job_id = path.rsplit("/", 1)[1]
                table.set(job_id, body["status"], body.get("message", ""))
                return self._send(200, {"ok": True})
            if path == "/_control/default":
                table.default_status = body["status"]
                return self._send(200, {"ok": True})
            if path.rstrip("/") == "/api/serve/applications":
                table.put_serve(host, body)
                return self._send(200, {})
            return self._send(404, {"error": f"no route {path}"})

        def do_DELETE(self):
            host, path = self._route()
            m = _JOB_PATH.match(path)
            if m:
                return self._send(200, {"deleted": True})
            return self._send(404, {"error": f"no route {path}"})

    return Handler


class DashboardClient:
    """What tests use to drive the stand-in."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")

    def _call(self, method: str, path: str, body: dict | None = None) -> dict:
        data = json.dumps(body).encode() if body is not None else None
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        # Bypass any HTTP_PROXY in the test's environment: the stand-in is on loopback.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(req, timeout=10) as resp:
            return json.loads(resp.read() or b"{}")

    def set_job(self, job_id: str, status: str, message: str = "") -> None:
        self._call("PUT", f"/_control/jobs/{job_id}", {"status": status, "message": message})

    def jobs(self) -> dict:
        return self._call("GET", "/_control/jobs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--kubeconfig", type=Path)
    ap.add_argument("--default-status", default="RUNNING")
    args = ap.parse_args()
    kube = KubeAPI(args.kubeconfig) if args.kubeconfig else None
    handler = make_handler(JobTable(kube, args.default_status), RealHeads(kube))
    server = ThreadingHTTPServer(("127.0.0.1", args.port), handler)
    print(f"ray dashboard stand-in on 127.0.0.1:{args.port}", flush=True)
    server.serve_forever()


if __name__ == "__main__":
    main()
