"""The same-host engine: collectives computed in a group's shared segment."""
