"""The `soma` command: one argparse tree above the supervisor, the sidecar and the cards.

The parser imports nothing but the standard library; each command's handler is imported when
it runs (see `soma_cli.main.HANDLERS`), so `soma status` never loads grpc or the sidecar.
Exit status everywhere: see `soma_runtime.exit_status`.
"""
