"""The one-command demo and the local stack (``make demo``, ``make up``).

``stack``  the emulator, factory_svc and activation_svc as child processes on loopback with TLS
``fleet``  the three parties played with the suite's own clients (provision, activate, first boot)
``view``   labels, the live fleet table, the hubs' telemetry tail, the summary (rich)
``cli``    ``run`` and ``up``
"""

from mainkit.shell import quiet_native_logs

quiet_native_logs()  # before anything loads gRPC: its C core reads GRPC_VERBOSITY once, when loaded
