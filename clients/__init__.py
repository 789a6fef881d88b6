"""Clients that use llm-service (or any OpenAI-compatible server) through the openai SDK."""
