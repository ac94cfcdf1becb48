"""The Kubernetes API side of flock: client setup, informers, Events, NodeConfig status.

Nothing above `flock.agent` imports this package: the agent reaches the cluster
only through the `Datastore` protocol (`flock.agent.datastore.kube`), so the
client library stays replaceable and the pure layers stay free of I/O.

The client is lightkube's kubeconfig/in-cluster loader (token rotation, exec
plugins, client certificates) handing us a plain httpx2 `AsyncClient`; every
request is written here against raw JSON, decoded with msgspec straight into
records that hold only the fields flock uses. Typed model layers (the official
client, kubernetes_asyncio, lightkube's models) cost 3-30x more memory per Pod
and 100-250 ms more import time, and an informer needs control over
resourceVersions and bookmarks that their watch helpers hide.
"""
