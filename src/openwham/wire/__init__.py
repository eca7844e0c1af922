"""openwham.wire."""
