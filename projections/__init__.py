"""Projections: read models derived from the event log, fed inline and by NATS subscribers.

Projections never import the HTTP layer.
"""
