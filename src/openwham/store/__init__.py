"""openwham.store."""
