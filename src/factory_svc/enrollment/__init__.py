"""Enrollment: the factory's DPS individual enrollments (Enroll, EnrollBatch, GetEnrollmentStatus,
TransferOwnership, RotateActivationCode, AcknowledgeActivationCodes).

Modules: ``model`` (typed values), ``lint`` (preflight certificate checks), ``service`` (Enroll and status),
``batch`` (EnrollBatch), ``codes`` (activation codes: made, rotated, acknowledged, purged), ``ownership``
(owner rules, TransferOwnership), ``outbox`` (durable queue, request ids, audit), ``retained`` (codes kept
encrypted until acknowledged), ``delivery`` (the background delivery loop), ``grpc`` (proto in and out),
``cli`` (commands), ``codes_file`` (the CLI's codes CSV), ``assembly`` (settings and wiring).
"""
