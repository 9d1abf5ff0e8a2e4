"""The OpenAI-compatible HTTP server: the app (server), request checks (admission), the protocol (openai_protocol),
and what runs its requests: the model in this process (local_backend) or in another one (engine_link,
frontend_process)."""
