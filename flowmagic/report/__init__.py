"""Text renderings of service documents and event streams, shared by the console and the magics."""
