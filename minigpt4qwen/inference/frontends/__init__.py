"""Front ends over the chat engine and the decoders: web UI, OpenAI-compatible server, batch generation."""
