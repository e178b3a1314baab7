"""The `soma` command: one argparse tree above the supervisor, the sidecar and the cards.

The parser imports nothing but the standard library; each command's handler is imported when
it runs (see `soma_cli.main.HANDLERS`), so `soma status` never loads grpc or the sidecar.
Exit status everywhere: 0 done, 1 a runtime failure, 2 a usage or configuration error (what an
operator must fix before anything will work; systemd's `RestartPreventExitStatus=2`).
"""
