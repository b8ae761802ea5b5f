"""Teachers behind a paid HTTP API: client.py (HTTP, retries, the cost bound), base.py (the shared teacher), imagen.py,
openai.py."""
