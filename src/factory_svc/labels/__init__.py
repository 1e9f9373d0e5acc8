"""Device labels: each enrolled device's GUID, activation code and a QR code that opens the activation portal
for it, as a print-ready PDF sheet, ZPL for Zebra printers, and one SVG and one PNG per label.

``render`` (the portal link, the layout, one function per format: pure, bytes out), ``cli`` (``labels``: from
a lot's manifest and codes file into ``<lot>/labels/``, 0600 files in a 0700 directory).
"""
