"""The exit statuses of every `soma` process, and what the supervisor and systemd make of them.

0 done; 1 a runtime failure (worth a restart); 2 a usage or setup error: the configuration, an
organ, the vault's key or a path must be fixed first, and a restart would fail the same way
(argparse exits 2 on a usage error too; the unit has `RestartPreventExitStatus=2`).
"""

RUNTIME_FAILURE = 1
SETUP_ERROR = 2
