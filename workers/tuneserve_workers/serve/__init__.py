"""The serve application (Ray Serve + vLLM). Design and the Ray Serve LLM comparison: app.py;
engine + OpenAI app + status: server.py; desired-set reconciler: adapters.py; metrics.py;
per-replica reports for the operator: report.py.

What the RayService pods need (the operator renders it):

- serveConfigV2: ``import_path: tuneserve_workers.serve.app:build_app``, ``args`` = ServeAppConfig
  (``adapters_file``, ``status_configmap`` set), deployment ``tuneserve`` overrides
  (``num_replicas``/``autoscaling_config``, ``ray_actor_options`` with the accelerator resources,
  optionally ``max_ongoing_requests``, default 256).
- The adapters ConfigMap mounted as a whole volume at ``ADAPTERS_DIR`` (no subPath: kubelet only
  refreshes whole ConfigMap volumes); content: a JSON list of ``{"name", "uri"}``.
- RBAC: ``patch`` on the status ConfigMap for the pods' service account (one key per replica).
- Env: ``VLLM_HOST_IP=127.0.0.1`` (engine front-end and core talk over loopback inside the pod);
  the catalog's platform env (``VLLM_PLUGINS`` / visible-devices variables); on CPU
  ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache); ``HF_HUB_OFFLINE``/``HF_TOKEN`` for hf:// models;
  object-store credentials (``AWS_*``...) for s3:// models and adapters; ``TUNESERVE_CACHE``
  (node-local download cache, default ``~/.cache/tuneserve-worker``).
  Optional: ``TUNESERVE_ADAPTER_POLL_S`` (2), ``TUNESERVE_ADAPTER_RETRY_S`` (30, retry of Failed
  adapters), ``TUNESERVE_PROBE_TIMEOUT_S`` (60), ``TUNESERVE_MAX_ONGOING_REQUESTS`` (256),
  ``TUNESERVE_ADAPTERS_FILE`` / ``TUNESERVE_SERVE_STATUS_CONFIGMAP`` (fallbacks for the config
  fields), ``TUNESERVE_SERVE_STATUS_DIR`` (also write the reports as files).
- NOT needed: ``VLLM_ALLOW_RUNTIME_LORA_UPDATING`` — adapters are loaded through the Python API;
  leaving it unset keeps vLLM's unauthenticated ``/v1/load_lora_adapter`` routes off.
- The image needs ``llguidance`` (a vLLM requirement missing from requirements/lock.txt).
"""
