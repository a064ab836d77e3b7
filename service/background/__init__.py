"""What runs beside the HTTP handlers in a serve process: the NATS bus, the outbox relay, leadership, the sweeper."""
