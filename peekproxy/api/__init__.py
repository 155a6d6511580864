"""HTTP edge: ASGI apps for the client, federation and metrics listeners."""
