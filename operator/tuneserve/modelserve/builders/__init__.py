"""ModelServe builders: the RayService (rayservice), the Serve app config and ConfigMaps (serve),
the replicas' RBAC (rbac); children.build_modelserve_children lists them in apply order."""
