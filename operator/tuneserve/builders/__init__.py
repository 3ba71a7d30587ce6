"""What both kinds render: object metadata and names (common), the Ray cluster spec (raycluster),
the ServiceAccount/Role/RoleBinding triple (rbac), and the RayService (rayservice; ModelServe's,
kept here while tests/worker import it from this path). Pure: plain dicts, deterministic, no API calls."""
