"""The IoT Hub half of the emulator: identity registry, twins, telemetry, direct methods, device MQTT
endpoint and service REST API."""
