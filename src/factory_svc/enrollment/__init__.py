"""Enrollment: the factory's DPS individual enrollments (Enroll, EnrollBatch, GetEnrollmentStatus).

Modules: ``lint`` (preflight certificate checks), ``model`` (typed values), ``service`` (the domain),
``outbox`` (durable SQLite queue + request ids), ``delivery`` (the background delivery loop), ``grpc_api``
(proto conversions, mixed into the FactoryServicer), ``runtime`` (settings and assembly).
"""
