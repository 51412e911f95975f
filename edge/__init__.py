"""The edge node: websocket chat streaming in front of the bus, and a client for it."""
