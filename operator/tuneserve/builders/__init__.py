"""What both kinds render: object metadata and names (common), the Ray cluster spec (raycluster),
the ServiceAccount/Role/RoleBinding triple (rbac). Pure: plain dicts, deterministic, no API calls."""
