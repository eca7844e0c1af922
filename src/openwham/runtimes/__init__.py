"""Agent runtimes: adapters that run an agent inside an attempt's sandbox."""
