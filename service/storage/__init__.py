"""PostgreSQL: the event log and its append path, the outbox's safe horizon, the schema and its migration, usage."""
