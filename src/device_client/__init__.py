"""The device side: factory provisioning, first-boot registration with DPS, telemetry to the hub.

CLI (``device-client``; global options ``--config FILE --state-root DIR --log-format auto|json|text -v``)::

    device-client provision DEVICE_ID [--force] [--server-keygen] [--key-type p256|p384|rsa2048|rsa3072]
                                      [--no-enroll] [--request-id ID] [--target HOST:PORT]
                                      [--insecure | --ca-file PEM [--cert-file PEM --key-file PEM]]
                                      [--id-scope S --global-endpoint HOST --trusted-ca-file PEM]
    device-client run DEVICE_ID [--interval SECONDS] [--buffer-max MESSAGES] [--give-up-after SECONDS]
                                [--id-scope ...]
    device-client status DEVICE_ID [--json]

Exit codes: 0 ok, 2 usage, 3 state directory missing/corrupted/in use, 4 identity unusable (key does not
match the certificate, certificate expired / not yet valid), 5 factory unreachable or refused, 6 identity
exists (use --force), 7 DPS/hub unusable past --give-up-after, 8 invalid settings, 9 certificate revoked
(DPS refused the device and the CRL its certificate names, verified against its issuer, lists it; `status`
then shows "revoked"), 130 interrupted (Ctrl-C; `run` stopped by SIGTERM exits 0).

Modules: ``settings`` (one typed settings object: defaults < --config TOML < the device's settings.toml <
DEVICE_CLIENT_* environment < flags), ``state`` (the per-device state directory and its layout),
``identity`` (keys, CSR, key/certificate checks), ``buffer`` (bounded persisted SQLite outbox),
``telemetry`` (message bodies), ``desired`` (desired properties -> reported acknowledgements),
``provisioning`` + ``factory_client`` (provision over gRPC), ``dps`` + ``hub`` (azure-iot-device aio
clients, every call under a deadline), ``revocation`` (the CRL the certificate names, after a refusal),
``renewal`` + ``est_client`` (certificate renewal: when, what is asked and accepted, the EST conversation),
``runtime`` (:class:`DeviceRuntime`, the run loop as an async API) with ``changeover`` (the certificate
change-over it runs: the renewal side task, DPS with the new certificate, promotion), ``cli``.
"""

from mainkit.shell import quiet_native_logs

quiet_native_logs()  # before anything loads gRPC: its C core reads GRPC_VERBOSITY once, when loaded
