"""Upstream MCP servers (`[[upstream]]`) hosted as organs, with pinned tool definitions.

Nothing is imported here: the mcp SDK is imported (by `organ`) only where an upstream is
configured (see `sidecar.loading`).
"""
