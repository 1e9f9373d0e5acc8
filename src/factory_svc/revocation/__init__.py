"""Revocation: RevokeCertificate, its cloud steps (recorded intents) and the CRL.

``model`` (reasons, the revocation mark, a request), ``service`` (the rules and the intent worker), ``crl``
(the CRL: built, signed, published as files and over HTTP), ``store`` (marks, audit, intents and CRL state in
the ledger database), ``grpc`` (proto in and out), ``cli`` (``revoke``).
"""
