"""openwham.cli."""
