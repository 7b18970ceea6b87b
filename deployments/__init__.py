"""Model deployments: one `ModelServer` per configured model, each owning one engine."""
