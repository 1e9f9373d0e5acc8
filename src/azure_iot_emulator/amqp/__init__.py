"""The emulator's AMQP 1.0 core: Apache Qpid Proton's engine over the emulator's TLS shell
(``connection.py``), the SASL exchange Azure's clients start with (``sasl.py``) and the request/response
nodes every Azure AMQP service has, ``$cbs`` and ``$management`` (``nodes.py``).  What the links mean is
the endpoint's business (``hub/amqp_endpoint.py``)."""
