"""Small routers, one per resource; ``app`` mounts each under both WHAM path styles."""
