"""ModelServe builders: the Serve app config and ConfigMaps (serve), the replicas RBAC (rbac);
children.build_modelserve_children lists them in apply order (the RayService is still rendered
by tuneserve.builders.rayservice, whose path tests/worker import)."""
