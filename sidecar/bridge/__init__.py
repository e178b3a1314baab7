"""The MCP bridge: chosen organ functions as MCP servers for any MCP client."""

from sidecar.bridge.instance import RunningBridge, serve_bridges

__all__ = ["RunningBridge", "serve_bridges"]
