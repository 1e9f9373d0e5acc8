"""The device side: factory provisioning, first-boot registration with DPS, telemetry to the hub."""
