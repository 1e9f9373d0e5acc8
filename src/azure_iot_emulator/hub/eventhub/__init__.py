"""The hub's built-in Event Hub-compatible endpoint (``messages/events``): telemetry read over AMQP."""
