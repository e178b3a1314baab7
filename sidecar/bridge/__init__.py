"""The MCP bridge: chosen organ functions as MCP servers for any MCP client.

Nothing is imported here: the mcp SDK costs the sidecar most of a second to import, which a
sidecar without `[[bridge]]` never pays (`sidecar.app` imports `instance` only for bridges).
"""
