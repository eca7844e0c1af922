"""openwham.engine."""
