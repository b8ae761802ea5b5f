"""Teachers behind a paid HTTP API: client.py (HTTP, retries, the cost bound), base.py (the shared teacher), gemini.py,
openai.py; their settings, the models' lifecycle and prices: core/api_config.py."""
