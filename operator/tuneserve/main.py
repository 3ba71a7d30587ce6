"""Entry point: `tuneserve-operator` (or `python -m tuneserve.main`).

Watches FineTuneJobs and ModelServes in all namespaces, or in those listed by TUNESERVE_NAMESPACES
(comma separated). Health: http://<TUNESERVE_HEALTH_ADDR or 0.0.0.0:8080>/healthz (liveness) and
/readyz (readiness).

With TUNESERVE_LEADER_ELECTION=true (the Helm chart's default) the process first takes the Lease
TUNESERVE_LEADER_ELECTION_NAMESPACE/TUNESERVE_LEADER_ELECTION_NAME as TUNESERVE_POD_NAME
(tuneserve/controller/leader.py), reconciles only while holding it, releases it on SIGTERM and exits when it
loses it, so a second replica takes over. Without it the process reconciles at once (tests, local).
"""
from __future__ import annotations

import http.server
import logging
import os
import signal
import socket
import sys
import threading
import urllib.request
from dataclasses import dataclass

from tuneserve.controller.keepout import refuse_kubernetes

refuse_kubernetes()   # before kopf, which imports `kubernetes` whenever it can (keepout.py)

import kopf  # noqa: E402

import tuneserve.controller.handlers  # noqa: E402,F401  (registers the handlers)
from tuneserve.controller.apiclient import Client  # noqa: E402
from tuneserve.controller.leader import LeaderElector  # noqa: E402

log = logging.getLogger("tuneserve.main")


@dataclass(frozen=True)
class Settings:
    """Everything main reads from the environment, read once."""
    namespaces: list[str]
    health_addr: str
    leader_election: bool
    lease_namespace: str
    lease_name: str
    identity: str

    @classmethod
    def from_env(cls) -> "Settings":
        env = os.environ
        return cls(namespaces=[n for n in env.get("TUNESERVE_NAMESPACES", "").split(",") if n],
                   health_addr=env.get("TUNESERVE_HEALTH_ADDR", "0.0.0.0:8080"),
                   leader_election=env.get("TUNESERVE_LEADER_ELECTION", "false").lower() == "true",
                   lease_namespace=env.get("TUNESERVE_LEADER_ELECTION_NAMESPACE", "tuneserve-system"),
                   lease_name=env.get("TUNESERVE_LEADER_ELECTION_NAME", "tuneserve-operator"),
                   identity=env.get("TUNESERVE_POD_NAME") or socket.gethostname())


def _split(addr: str) -> tuple[str, int]:
    host, _, port = addr.rpartition(":")
    return host or "0.0.0.0", int(port)


def _run_kopf(settings: Settings, liveness_addr: str) -> None:
    # identity: kopf would derive one from the login name, which a container's arbitrary uid lacks
    # (getpwuid fails: the first real run of the image crash-looped on that).
    kopf.run(standalone=True, clusterwide=not settings.namespaces, namespaces=settings.namespaces,
             liveness_endpoint=f"http://{liveness_addr}/healthz", identity=settings.identity)


def _stop_kopf() -> None:
    """kopf stops on SIGTERM (its own handler in the main thread's loop). Not its stop_flag: a
    threading.Event flag is awaited in the default executor, whose thread then blocks the
    loop's shutdown until the process is killed."""
    os.kill(os.getpid(), signal.SIGTERM)


class _Health(http.server.BaseHTTPRequestHandler):
    """/healthz: alive (a leader also asks kopf's own liveness endpoint); /readyz: the same: a
    standby is ready to take over, so both replicas count for `helm --wait` and rollouts."""
    elector: LeaderElector
    kopf_liveness = ""

    def do_GET(self) -> None:   # noqa: N802 (http.server's name)
        if self.path not in ("/healthz", "/readyz"):
            self.send_error(404)
            return
        ok, what = True, "standby"
        if self.elector.leading.is_set():
            what = "leader"
            try:
                with urllib.request.urlopen(self.kopf_liveness, timeout=3) as resp:
                    ok = resp.status == 200
            except OSError:
                ok = False   # kopf starting or stuck
        self.send_response(200 if ok else 503)
        self.end_headers()
        self.wfile.write(f"{what} {'ok' if ok else 'not ok'}\n".encode())

    def log_message(self, *_args) -> None:   # probes every few seconds: not worth a log line
        pass


def _serve_health(addr: str, elector: LeaderElector, kopf_liveness: str) -> http.server.ThreadingHTTPServer:
    handler = type("Health", (_Health,), {"elector": elector, "kopf_liveness": kopf_liveness})
    server = http.server.ThreadingHTTPServer(_split(addr), handler)
    threading.Thread(target=server.serve_forever, name="health", daemon=True).start()
    return server


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_elected(settings: Settings) -> int:
    """Wait for the Lease, reconcile while holding it, release it on the way out."""
    elector = LeaderElector(Client.from_environment(connections=1), settings.lease_namespace, settings.lease_name,
                            settings.identity)
    liveness = f"127.0.0.1:{_free_loopback_port()}"
    _serve_health(settings.health_addr, elector, f"http://{liveness}/healthz")
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())   # while waiting; kopf installs its own
    log.info("waiting for leadership (Lease %s/%s) as %s", settings.lease_namespace, settings.lease_name,
             settings.identity)
    if not elector.acquire(stop):
        return 0
    def keep() -> None:
        elector.keep(stop)
        if elector.lost.is_set():
            _stop_kopf()

    threading.Thread(target=keep, name="lease", daemon=True).start()
    try:
        _run_kopf(settings, liveness)
    finally:
        stop.set()
        if not elector.lost.is_set():
            elector.release()
    return 1 if elector.lost.is_set() else 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("TUNESERVE_LOG_LEVEL", "INFO"),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # kopf logs every handler run at INFO; the operator logs what it writes (kubeapi.py) instead.
    logging.getLogger("kopf.objects").setLevel(os.environ.get("TUNESERVE_KOPF_LOG_LEVEL", "WARNING"))
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)   # a line per liveness probe otherwise
    settings = Settings.from_env()
    if settings.leader_election:
        return run_elected(settings)
    _run_kopf(settings, settings.health_addr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
