"""`soma supervise`: runs the sidecar and the agent runtimes, gives each runtime its identity,
restarts what dies, and speaks systemd's notify protocol."""
