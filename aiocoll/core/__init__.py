"""The spine of one rank: its world, communicator, frame keys, errors, event loop and handshake."""
