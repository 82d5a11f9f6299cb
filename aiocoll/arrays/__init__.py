"""What callers pass in (numpy arrays, torch tensors, buffers) and the arithmetic on it."""
