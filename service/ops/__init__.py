"""Capabilities an operator runs: the audit chain (verify, export, as-of), projection replay, better-auth import."""
