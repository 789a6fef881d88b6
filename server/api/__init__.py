"""One small module per OpenAI surface: parse its request into the pipeline's inputs, render the
pipeline's events into its wire format (a whole response, or SSE chunks)."""
