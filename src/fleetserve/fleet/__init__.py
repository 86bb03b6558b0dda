"""The Fleet: the one live view of replicas, their states, load and engine signals."""
