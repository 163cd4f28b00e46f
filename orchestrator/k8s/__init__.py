"""Kubernetes: the fleet as a KubeRay RayService (``slm render``, ``slm apply``) and the
JSON schema that the Helm chart's ``values.schema.json`` embeds for its ``fleet`` value."""
