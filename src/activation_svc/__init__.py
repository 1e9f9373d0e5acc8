"""The activation service: the machine manufacturer activates an enrolled device with its metadata."""

from mainkit.shell import quiet_native_logs

quiet_native_logs()  # before anything loads gRPC: its C core reads GRPC_VERBOSITY once, when loaded
