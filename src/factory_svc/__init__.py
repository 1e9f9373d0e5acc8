"""The factory service: mints device certificates and enrolls devices in DPS (disabled)."""

from mainkit.shell import quiet_native_logs

quiet_native_logs()  # before anything loads gRPC: its C core reads GRPC_VERBOSITY once, when loaded
