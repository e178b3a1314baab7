"""`python -m soma_cli …` is `soma …` (the supervisor starts its sidecar this way)."""

from soma_cli.main import main

main()
