"""The pure domain core: events, decide/evolve/fold, the wire formats of the freshness proof, key records."""
