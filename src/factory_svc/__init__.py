"""The factory service: mints device certificates and enrolls devices in DPS (disabled)."""
