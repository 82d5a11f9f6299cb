"""Shared-memory primitives: segments passed by descriptor, memory fences, doorbells."""
