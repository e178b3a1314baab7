"""Upstream MCP servers (`[[upstream]]`) hosted as organs, with pinned tool definitions."""

from sidecar.upstream.organ import UpstreamOrgan
from sidecar.upstream.pins import PinStore

__all__ = ["PinStore", "UpstreamOrgan"]
