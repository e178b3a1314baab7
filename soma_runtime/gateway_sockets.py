"""How the supervisor hands the gateway's listening sockets to the sidecar: inherited
descriptors, named in this environment variable as `runtime=fd,runtime=fd`."""

SOCKETS_ENV = "SOMA_GATEWAY_SOCKETS"
