"""Model parts: vision tower, Q-Former, projection and LLM composed into one module (no I/O here)."""
