"""keyledger: an event-sourced API-key lifecycle service, wire-compatible with better-auth's API-key plugin."""

__version__ = "0.1.0"
