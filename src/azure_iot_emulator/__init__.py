"""A local Azure IoT Hub Device Provisioning Service + IoT Hub that Microsoft's SDKs talk to unchanged.

Run it: ``iot-emulator serve [--data-dir DIR] [--dps-host HOST] [--hub-host HOST ...]`` (or
``python -m azure_iot_emulator serve``).  At start it writes ``{data_dir}/connection.json`` with the
ID scope, the DPS device endpoint, the CA path and the DPS / IoT Hub service connection strings.

Layout: ``mqtt/`` the sans-IO MQTT core and TLS shell (plug-in interface in ``mqtt/endpoint.py``),
``dps/`` the Device Provisioning Service, ``hub/`` the IoT Hub, ``app.py`` the wiring, ``cli.py``.
"""
