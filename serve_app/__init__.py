"""The router ingress: REST + OpenAI-compatible API, SSE streaming and the chat page."""
