"""The OpenAI-compatible chat API served beside the page (same engine, same batch)."""
