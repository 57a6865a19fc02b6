"""Stage 7 — bench: load generation and vLLM-style serving metrics against any OpenAI-compatible endpoint."""
