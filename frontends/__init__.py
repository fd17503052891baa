"""Ways in: the OpenAI REST API on Sanic, and the command line."""
