"""The workflow-aware gateway: live state view, urgency queues, OpenAI-compatible HTTP API."""
