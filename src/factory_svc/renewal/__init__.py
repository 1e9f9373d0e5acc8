"""Renewal: devices renew their certificates over EST (RFC 7030) with the certificate they hold."""
