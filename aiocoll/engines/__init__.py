"""How a collective runs: message passing over the transports, or the same-host shared-memory engine."""
