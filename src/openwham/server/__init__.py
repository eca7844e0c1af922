"""openwham.server."""
