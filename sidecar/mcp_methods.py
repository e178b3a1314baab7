"""The MCP method names the sidecar's MCP parts look for in the messages they pass on (the
bridge's guard in clients' requests, the stdio upstream transport in its own): one spelling
for both. The mcp SDK matches these literals itself and exports no constant for them."""

from __future__ import annotations

from typing import Final

# A request given up: no answer is awaited any more.
CANCELLED: Final = "notifications/cancelled"
