"""Production lots: MintCertificates, a resumable stream of a lot's items.

``model`` (header, items, answers, what the ledger keeps), ``service`` (the rules), ``store`` (``lots`` and
``lot_items`` in the ledger database), ``grpc`` (the stream in and out), ``cli`` (``lot``).
"""
