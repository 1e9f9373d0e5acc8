"""A local Azure IoT Hub Device Provisioning Service + IoT Hub that Microsoft's SDKs talk to unchanged."""
