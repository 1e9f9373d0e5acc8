"""mainkit: what every program of this project starts with: its settings, layered, and the shell its
commands run in.

- ``mainkit.settings``: the one settings loader.  A key (``server.port``, ``telemetry_interval_s``) is
  looked up in command-line flags, then the environment (``<PREFIX>_SERVER_PORT``), then TOML files
  (``[server] port = ...``; a later file wins over an earlier one), then the program's defaults
  (:class:`SettingsSource`); :class:`FlagKeys` is the one place where a program says which flag sets
  which key.
- ``mainkit.shell``: the one command-line shell (:func:`run_command`): a command's known failures become
  one line and a documented exit code, Ctrl-C exits 130 without a traceback, a reader that closed the pipe
  (``| head``) ends the program quietly, anything else is one line, a logged traceback and exit 1.

Why a package of its own: the Azure emulator is a separate program that imports nothing from the suite
(it stands in for Azure, reached only over the wire), yet it reads settings and runs commands like every
other program here.  So, like ``litestore`` and ``jsonsafe``, this package depends on the standard library
only and on no other package of the project, and both sides import it; ``provkit.settings`` and
``provkit.cli_shell`` add what only the suite has (server and database settings, gRPC errors).  Keep it
that way: no imports from provkit, the services, the device client or the emulator here.
"""
