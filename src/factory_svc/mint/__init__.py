"""Minting: MintCertificate, ListCertificates, GetCertificate.

``model`` (typed values, the issued certificate as the ledger keeps it), ``keys`` and ``csr`` (key types,
CSR checks), ``service`` (the rules: ``MintingService``, ``CertificateCatalog``), ``store`` (``certificates``
and request ids in the ledger database), ``grpc`` (proto in and out), ``cli`` (``mint``, ``list``, ``get``).
"""
