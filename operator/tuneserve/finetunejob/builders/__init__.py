"""FineTuneJob builders: the RayJob (rayjob), its config and progress ConfigMaps (config), the
worker RBAC (rbac); children.build_finetune_children lists them in apply order."""
