"""Non-Kubernetes targets of one spec: local processes (`moeserve up`) and Ray."""
