"""The serve application (Ray Serve + vLLM): see app.py for the design and server.py/adapters.py."""
