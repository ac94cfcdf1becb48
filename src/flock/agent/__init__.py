"""The node agent: RPC server, datastores, reconcile loop."""
