"""llm-service: a self-hosted, OpenAI-compatible LLM inference server."""

__version__ = "0.1.0"
