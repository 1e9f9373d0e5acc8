"""The Device Provisioning Service half of the emulator: enrollments, registrations, service REST API
and device registration over MQTT."""
