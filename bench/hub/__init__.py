"""The pieces of the IoT Hub benchmark (``bench/bench_hub.py`` runs them):

- :mod:`.settings`  what is measured (device counts, durations), with the full and the quick set;
- :mod:`.loadgen`   the load generator, run in processes of its own (simulated devices over MQTT/TLS);
- :mod:`.servers`   the servers under test: the emulator (the tests' process harness) and Mosquitto;
- :mod:`.measure`   one ingest round or one scale run against a server, with its CPU and memory;
- :mod:`.report`    the markdown section.
"""
