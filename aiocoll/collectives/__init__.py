"""The public collectives: check the arguments, then hand the work to the group's engine."""
