"""One serve replica (``ReplicaServer``: vLLM engine, OpenAI app, reports) under plain uvicorn, in
a process of its own: ``python replica_process.py CONFIG.json PORT``.

The engine tests use it instead of Ray Serve where Ray adds nothing to what they check (the
engine's dtype, how an engine failure is reported) and costs a minute of start-up. It exits 3
when the replica failed to start (the report says why), 0 after serving until SIGTERM.
"""
from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys


async def main(config_path: str, port: int) -> int:
    import uvicorn
    from tuneserve_workers.contract import ServeAppConfig
    from tuneserve_workers.serve.server import EngineFailed, ReplicaServer

    cfg = ServeAppConfig.model_validate(json.loads(open(config_path).read()))
    server = ReplicaServer(cfg, replica_id="test-replica")
    try:
        app = await server.start()
    except EngineFailed as e:
        print(f"replica failed: {e}", flush=True)
        return 3
    web = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, lambda: setattr(web, "should_exit", True))
    try:
        await web.serve()
    finally:
        await server.shutdown()
    return 0


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    sys.exit(asyncio.run(main(sys.argv[1], int(sys.argv[2]))))
