"""The issuing CA: its certificate and chain (``issuing``), the signer that holds its key (``signer``: the
``CaSigner`` port and the file backend; ``pkcs11_signer``: the PKCS#11 backend), its settings and the CA
they name (``settings``: ``ca_settings``, ``open_ca``), and ``cli`` (``ca init``, ``ca show``).
"""
