"""DPS's custom allocation webhook, served by activation_svc in group mode (``docs/group-mode.md``)."""
