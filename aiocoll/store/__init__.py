"""The rendezvous store: how ranks find each other (addresses only, never tensors)."""
