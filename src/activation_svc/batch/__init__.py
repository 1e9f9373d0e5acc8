"""Whole shipments activated at once: a CSV of devices (``activation-svc activate-batch``, the portal's
``/batch`` page), each row one Activate through the service, with a result per row.

``shipment``: reading the CSV (``read_shipment``), the request id of a row (``row_request_id``), running
the rows against the service with bounded concurrency (``activate_rows``) and the result file
(``ResultWriter``).  ``cli``: the command, its progress bar and its exit status.
"""
