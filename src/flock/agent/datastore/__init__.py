"""Where the agent's cluster state comes from: manifests directory or Kubernetes API."""
