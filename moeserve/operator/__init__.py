"""The Kubernetes operator: MoEDeployment -> worker pools, router and autoscalers.

``render`` is pure (no cluster, no kopf); ``handlers`` wires it into kopf. Importing this package
does not import kopf.
"""

__all__: list[str] = []
