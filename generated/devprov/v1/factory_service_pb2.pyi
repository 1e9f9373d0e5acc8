import datetime

from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RevocationReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REVOCATION_REASON_UNSPECIFIED: _ClassVar[RevocationReason]
    REVOCATION_REASON_KEY_COMPROMISE: _ClassVar[RevocationReason]
    REVOCATION_REASON_CA_COMPROMISE: _ClassVar[RevocationReason]
    REVOCATION_REASON_AFFILIATION_CHANGED: _ClassVar[RevocationReason]
    REVOCATION_REASON_SUPERSEDED: _ClassVar[RevocationReason]
    REVOCATION_REASON_CESSATION_OF_OPERATION: _ClassVar[RevocationReason]
    REVOCATION_REASON_CERTIFICATE_HOLD: _ClassVar[RevocationReason]
    REVOCATION_REASON_PRIVILEGE_WITHDRAWN: _ClassVar[RevocationReason]
    REVOCATION_REASON_AA_COMPROMISE: _ClassVar[RevocationReason]

class KeyType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_TYPE_UNSPECIFIED: _ClassVar[KeyType]
    KEY_TYPE_EC_P256: _ClassVar[KeyType]
    KEY_TYPE_EC_P384: _ClassVar[KeyType]
    KEY_TYPE_RSA_2048: _ClassVar[KeyType]
    KEY_TYPE_RSA_3072: _ClassVar[KeyType]
    KEY_TYPE_RSA_OTHER: _ClassVar[KeyType]

class KeySource(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    KEY_SOURCE_UNSPECIFIED: _ClassVar[KeySource]
    KEY_SOURCE_CSR: _ClassVar[KeySource]
    KEY_SOURCE_SERVER_GENERATED: _ClassVar[KeySource]

class EnrollOutcome(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENROLL_OUTCOME_UNSPECIFIED: _ClassVar[EnrollOutcome]
    ENROLL_OUTCOME_CREATED: _ClassVar[EnrollOutcome]
    ENROLL_OUTCOME_UNCHANGED: _ClassVar[EnrollOutcome]
    ENROLL_OUTCOME_REPLACED: _ClassVar[EnrollOutcome]
    ENROLL_OUTCOME_QUEUED: _ClassVar[EnrollOutcome]

class EnrollmentDelivery(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENROLLMENT_DELIVERY_UNSPECIFIED: _ClassVar[EnrollmentDelivery]
    ENROLLMENT_DELIVERY_LIVE: _ClassVar[EnrollmentDelivery]
    ENROLLMENT_DELIVERY_QUEUED: _ClassVar[EnrollmentDelivery]

class EnrollmentState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ENROLLMENT_STATE_UNSPECIFIED: _ClassVar[EnrollmentState]
    ENROLLMENT_STATE_PENDING: _ClassVar[EnrollmentState]
    ENROLLMENT_STATE_DELIVERED: _ClassVar[EnrollmentState]
    ENROLLMENT_STATE_FAILED: _ClassVar[EnrollmentState]
    ENROLLMENT_STATE_LIVE: _ClassVar[EnrollmentState]
    ENROLLMENT_STATE_NOT_FOUND: _ClassVar[EnrollmentState]
    ENROLLMENT_STATE_REVOKED: _ClassVar[EnrollmentState]
REVOCATION_REASON_UNSPECIFIED: RevocationReason
REVOCATION_REASON_KEY_COMPROMISE: RevocationReason
REVOCATION_REASON_CA_COMPROMISE: RevocationReason
REVOCATION_REASON_AFFILIATION_CHANGED: RevocationReason
REVOCATION_REASON_SUPERSEDED: RevocationReason
REVOCATION_REASON_CESSATION_OF_OPERATION: RevocationReason
REVOCATION_REASON_CERTIFICATE_HOLD: RevocationReason
REVOCATION_REASON_PRIVILEGE_WITHDRAWN: RevocationReason
REVOCATION_REASON_AA_COMPROMISE: RevocationReason
KEY_TYPE_UNSPECIFIED: KeyType
KEY_TYPE_EC_P256: KeyType
KEY_TYPE_EC_P384: KeyType
KEY_TYPE_RSA_2048: KeyType
KEY_TYPE_RSA_3072: KeyType
KEY_TYPE_RSA_OTHER: KeyType
KEY_SOURCE_UNSPECIFIED: KeySource
KEY_SOURCE_CSR: KeySource
KEY_SOURCE_SERVER_GENERATED: KeySource
ENROLL_OUTCOME_UNSPECIFIED: EnrollOutcome
ENROLL_OUTCOME_CREATED: EnrollOutcome
ENROLL_OUTCOME_UNCHANGED: EnrollOutcome
ENROLL_OUTCOME_REPLACED: EnrollOutcome
ENROLL_OUTCOME_QUEUED: EnrollOutcome
ENROLLMENT_DELIVERY_UNSPECIFIED: EnrollmentDelivery
ENROLLMENT_DELIVERY_LIVE: EnrollmentDelivery
ENROLLMENT_DELIVERY_QUEUED: EnrollmentDelivery
ENROLLMENT_STATE_UNSPECIFIED: EnrollmentState
ENROLLMENT_STATE_PENDING: EnrollmentState
ENROLLMENT_STATE_DELIVERED: EnrollmentState
ENROLLMENT_STATE_FAILED: EnrollmentState
ENROLLMENT_STATE_LIVE: EnrollmentState
ENROLLMENT_STATE_NOT_FOUND: EnrollmentState
ENROLLMENT_STATE_REVOKED: EnrollmentState

class ServerKeyGeneration(_message.Message):
    __slots__ = ("key_type",)
    KEY_TYPE_FIELD_NUMBER: _ClassVar[int]
    key_type: KeyType
    def __init__(self, key_type: _Optional[_Union[KeyType, str]] = ...) -> None: ...

class IssuedCertificate(_message.Message):
    __slots__ = ("serial_number", "device_id", "certificate_pem", "certificate_chain_pem", "sha1_thumbprint", "sha256_thumbprint", "not_before", "not_after", "issue_time", "key_type", "key_source", "caller_identity", "request_id", "revoked", "revocation_time", "revocation_reason")
    SERIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_CHAIN_PEM_FIELD_NUMBER: _ClassVar[int]
    SHA1_THUMBPRINT_FIELD_NUMBER: _ClassVar[int]
    SHA256_THUMBPRINT_FIELD_NUMBER: _ClassVar[int]
    NOT_BEFORE_FIELD_NUMBER: _ClassVar[int]
    NOT_AFTER_FIELD_NUMBER: _ClassVar[int]
    ISSUE_TIME_FIELD_NUMBER: _ClassVar[int]
    KEY_TYPE_FIELD_NUMBER: _ClassVar[int]
    KEY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    CALLER_IDENTITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    REVOKED_FIELD_NUMBER: _ClassVar[int]
    REVOCATION_TIME_FIELD_NUMBER: _ClassVar[int]
    REVOCATION_REASON_FIELD_NUMBER: _ClassVar[int]
    serial_number: str
    device_id: str
    certificate_pem: str
    certificate_chain_pem: str
    sha1_thumbprint: str
    sha256_thumbprint: str
    not_before: _timestamp_pb2.Timestamp
    not_after: _timestamp_pb2.Timestamp
    issue_time: _timestamp_pb2.Timestamp
    key_type: KeyType
    key_source: KeySource
    caller_identity: str
    request_id: str
    revoked: bool
    revocation_time: _timestamp_pb2.Timestamp
    revocation_reason: RevocationReason
    def __init__(self, serial_number: _Optional[str] = ..., device_id: _Optional[str] = ..., certificate_pem: _Optional[str] = ..., certificate_chain_pem: _Optional[str] = ..., sha1_thumbprint: _Optional[str] = ..., sha256_thumbprint: _Optional[str] = ..., not_before: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., not_after: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., issue_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., key_type: _Optional[_Union[KeyType, str]] = ..., key_source: _Optional[_Union[KeySource, str]] = ..., caller_identity: _Optional[str] = ..., request_id: _Optional[str] = ..., revoked: _Optional[bool] = ..., revocation_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., revocation_reason: _Optional[_Union[RevocationReason, str]] = ...) -> None: ...

class MintCertificateRequest(_message.Message):
    __slots__ = ("device_id", "csr_pem", "server_key_generation", "validity", "request_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    SERVER_KEY_GENERATION_FIELD_NUMBER: _ClassVar[int]
    VALIDITY_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    csr_pem: str
    server_key_generation: ServerKeyGeneration
    validity: _duration_pb2.Duration
    request_id: str
    def __init__(self, device_id: _Optional[str] = ..., csr_pem: _Optional[str] = ..., server_key_generation: _Optional[_Union[ServerKeyGeneration, _Mapping]] = ..., validity: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class MintCertificateResponse(_message.Message):
    __slots__ = ("certificate", "private_key_pem", "unexpired_certificate_count", "replayed")
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    UNEXPIRED_CERTIFICATE_COUNT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    certificate: IssuedCertificate
    private_key_pem: str
    unexpired_certificate_count: int
    replayed: bool
    def __init__(self, certificate: _Optional[_Union[IssuedCertificate, _Mapping]] = ..., private_key_pem: _Optional[str] = ..., unexpired_certificate_count: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class ListCertificatesRequest(_message.Message):
    __slots__ = ("device_id", "page_size", "page_token")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    page_size: int
    page_token: str
    def __init__(self, device_id: _Optional[str] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class ListCertificatesResponse(_message.Message):
    __slots__ = ("certificates", "next_page_token")
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    certificates: _containers.RepeatedCompositeFieldContainer[IssuedCertificate]
    next_page_token: str
    def __init__(self, certificates: _Optional[_Iterable[_Union[IssuedCertificate, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class GetCertificateRequest(_message.Message):
    __slots__ = ("serial_number",)
    SERIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    serial_number: str
    def __init__(self, serial_number: _Optional[str] = ...) -> None: ...

class GetCertificateResponse(_message.Message):
    __slots__ = ("certificate",)
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    certificate: IssuedCertificate
    def __init__(self, certificate: _Optional[_Union[IssuedCertificate, _Mapping]] = ...) -> None: ...

class EnrollRequest(_message.Message):
    __slots__ = ("device_id", "certificate_pem", "replace", "request_id", "owner_oem", "replace_reason")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_OEM_FIELD_NUMBER: _ClassVar[int]
    REPLACE_REASON_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    certificate_pem: str
    replace: bool
    request_id: str
    owner_oem: str
    replace_reason: str
    def __init__(self, device_id: _Optional[str] = ..., certificate_pem: _Optional[str] = ..., replace: _Optional[bool] = ..., request_id: _Optional[str] = ..., owner_oem: _Optional[str] = ..., replace_reason: _Optional[str] = ...) -> None: ...

class EnrollResponse(_message.Message):
    __slots__ = ("device_id", "outcome", "delivery", "activation_code", "sha1_thumbprint", "sha256_thumbprint", "replayed")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    DELIVERY_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_CODE_FIELD_NUMBER: _ClassVar[int]
    SHA1_THUMBPRINT_FIELD_NUMBER: _ClassVar[int]
    SHA256_THUMBPRINT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    outcome: EnrollOutcome
    delivery: EnrollmentDelivery
    activation_code: str
    sha1_thumbprint: str
    sha256_thumbprint: str
    replayed: bool
    def __init__(self, device_id: _Optional[str] = ..., outcome: _Optional[_Union[EnrollOutcome, str]] = ..., delivery: _Optional[_Union[EnrollmentDelivery, str]] = ..., activation_code: _Optional[str] = ..., sha1_thumbprint: _Optional[str] = ..., sha256_thumbprint: _Optional[str] = ..., replayed: _Optional[bool] = ...) -> None: ...

class EnrollBatchItem(_message.Message):
    __slots__ = ("device_id", "certificate_pem", "replace", "owner_oem", "replace_reason")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_PEM_FIELD_NUMBER: _ClassVar[int]
    REPLACE_FIELD_NUMBER: _ClassVar[int]
    OWNER_OEM_FIELD_NUMBER: _ClassVar[int]
    REPLACE_REASON_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    certificate_pem: str
    replace: bool
    owner_oem: str
    replace_reason: str
    def __init__(self, device_id: _Optional[str] = ..., certificate_pem: _Optional[str] = ..., replace: _Optional[bool] = ..., owner_oem: _Optional[str] = ..., replace_reason: _Optional[str] = ...) -> None: ...

class EnrollBatchRequest(_message.Message):
    __slots__ = ("items", "request_id")
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[EnrollBatchItem]
    request_id: str
    def __init__(self, items: _Optional[_Iterable[_Union[EnrollBatchItem, _Mapping]]] = ..., request_id: _Optional[str] = ...) -> None: ...

class EnrollItemError(_message.Message):
    __slots__ = ("code", "reason", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    reason: str
    message: str
    def __init__(self, code: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class EnrollBatchResult(_message.Message):
    __slots__ = ("index", "device_id", "response", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    device_id: str
    response: EnrollResponse
    error: EnrollItemError
    def __init__(self, index: _Optional[int] = ..., device_id: _Optional[str] = ..., response: _Optional[_Union[EnrollResponse, _Mapping]] = ..., error: _Optional[_Union[EnrollItemError, _Mapping]] = ...) -> None: ...

class EnrollBatchResponse(_message.Message):
    __slots__ = ("results", "enrolled_count", "queued_count", "failed_count", "replayed")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    ENROLLED_COUNT_FIELD_NUMBER: _ClassVar[int]
    QUEUED_COUNT_FIELD_NUMBER: _ClassVar[int]
    FAILED_COUNT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[EnrollBatchResult]
    enrolled_count: int
    queued_count: int
    failed_count: int
    replayed: bool
    def __init__(self, results: _Optional[_Iterable[_Union[EnrollBatchResult, _Mapping]]] = ..., enrolled_count: _Optional[int] = ..., queued_count: _Optional[int] = ..., failed_count: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class GetEnrollmentStatusRequest(_message.Message):
    __slots__ = ("device_id",)
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    def __init__(self, device_id: _Optional[str] = ...) -> None: ...

class GetEnrollmentStatusResponse(_message.Message):
    __slots__ = ("device_id", "state", "queued_time", "delivered_time", "attempts", "failure_reason", "failure_message", "provisioning_status", "sha256_thumbprint", "owner_oem", "registration_status", "assigned_hub", "registration_updated_time", "last_activity_time", "hub_connection_state")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    QUEUED_TIME_FIELD_NUMBER: _ClassVar[int]
    DELIVERED_TIME_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    FAILURE_MESSAGE_FIELD_NUMBER: _ClassVar[int]
    PROVISIONING_STATUS_FIELD_NUMBER: _ClassVar[int]
    SHA256_THUMBPRINT_FIELD_NUMBER: _ClassVar[int]
    OWNER_OEM_FIELD_NUMBER: _ClassVar[int]
    REGISTRATION_STATUS_FIELD_NUMBER: _ClassVar[int]
    ASSIGNED_HUB_FIELD_NUMBER: _ClassVar[int]
    REGISTRATION_UPDATED_TIME_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVITY_TIME_FIELD_NUMBER: _ClassVar[int]
    HUB_CONNECTION_STATE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    state: EnrollmentState
    queued_time: _timestamp_pb2.Timestamp
    delivered_time: _timestamp_pb2.Timestamp
    attempts: int
    failure_reason: str
    failure_message: str
    provisioning_status: str
    sha256_thumbprint: str
    owner_oem: str
    registration_status: str
    assigned_hub: str
    registration_updated_time: _timestamp_pb2.Timestamp
    last_activity_time: _timestamp_pb2.Timestamp
    hub_connection_state: str
    def __init__(self, device_id: _Optional[str] = ..., state: _Optional[_Union[EnrollmentState, str]] = ..., queued_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., delivered_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., attempts: _Optional[int] = ..., failure_reason: _Optional[str] = ..., failure_message: _Optional[str] = ..., provisioning_status: _Optional[str] = ..., sha256_thumbprint: _Optional[str] = ..., owner_oem: _Optional[str] = ..., registration_status: _Optional[str] = ..., assigned_hub: _Optional[str] = ..., registration_updated_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., last_activity_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., hub_connection_state: _Optional[str] = ...) -> None: ...

class TransferOwnershipRequest(_message.Message):
    __slots__ = ("device_id", "owner_oem", "reason", "request_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_OEM_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    owner_oem: str
    reason: str
    request_id: str
    def __init__(self, device_id: _Optional[str] = ..., owner_oem: _Optional[str] = ..., reason: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class TransferOwnershipResponse(_message.Message):
    __slots__ = ("device_id", "owner_oem", "previous_owner_oem", "changed", "replayed")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    OWNER_OEM_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_OWNER_OEM_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    owner_oem: str
    previous_owner_oem: str
    changed: bool
    replayed: bool
    def __init__(self, device_id: _Optional[str] = ..., owner_oem: _Optional[str] = ..., previous_owner_oem: _Optional[str] = ..., changed: _Optional[bool] = ..., replayed: _Optional[bool] = ...) -> None: ...

class RotateActivationCodeRequest(_message.Message):
    __slots__ = ("device_id", "request_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    request_id: str
    def __init__(self, device_id: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class RotateActivationCodeResponse(_message.Message):
    __slots__ = ("device_id", "activation_code", "replayed")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_CODE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    activation_code: str
    replayed: bool
    def __init__(self, device_id: _Optional[str] = ..., activation_code: _Optional[str] = ..., replayed: _Optional[bool] = ...) -> None: ...

class AcknowledgeActivationCodesRequest(_message.Message):
    __slots__ = ("device_ids", "request_id")
    DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    device_ids: _containers.RepeatedScalarFieldContainer[str]
    request_id: str
    def __init__(self, device_ids: _Optional[_Iterable[str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class AcknowledgeActivationCodesResponse(_message.Message):
    __slots__ = ("acknowledged_count", "replayed")
    ACKNOWLEDGED_COUNT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    acknowledged_count: int
    replayed: bool
    def __init__(self, acknowledged_count: _Optional[int] = ..., replayed: _Optional[bool] = ...) -> None: ...

class RevokeCertificateRequest(_message.Message):
    __slots__ = ("device_id", "serial_number", "reason", "request_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    SERIAL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    serial_number: str
    reason: RevocationReason
    request_id: str
    def __init__(self, device_id: _Optional[str] = ..., serial_number: _Optional[str] = ..., reason: _Optional[_Union[RevocationReason, str]] = ..., request_id: _Optional[str] = ...) -> None: ...

class RevokeCertificateResponse(_message.Message):
    __slots__ = ("device_id", "certificates", "newly_revoked_count", "enrollment_disabled", "hub_identity_disabled", "crl_number", "crl_this_update")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATES_FIELD_NUMBER: _ClassVar[int]
    NEWLY_REVOKED_COUNT_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_DISABLED_FIELD_NUMBER: _ClassVar[int]
    HUB_IDENTITY_DISABLED_FIELD_NUMBER: _ClassVar[int]
    CRL_NUMBER_FIELD_NUMBER: _ClassVar[int]
    CRL_THIS_UPDATE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    certificates: _containers.RepeatedCompositeFieldContainer[IssuedCertificate]
    newly_revoked_count: int
    enrollment_disabled: bool
    hub_identity_disabled: bool
    crl_number: int
    crl_this_update: _timestamp_pb2.Timestamp
    def __init__(self, device_id: _Optional[str] = ..., certificates: _Optional[_Iterable[_Union[IssuedCertificate, _Mapping]]] = ..., newly_revoked_count: _Optional[int] = ..., enrollment_disabled: _Optional[bool] = ..., hub_identity_disabled: _Optional[bool] = ..., crl_number: _Optional[int] = ..., crl_this_update: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ...) -> None: ...

class LotHeader(_message.Message):
    __slots__ = ("lot_id", "key_source", "key_type", "item_count", "derive_device_ids", "validity")
    LOT_ID_FIELD_NUMBER: _ClassVar[int]
    KEY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    KEY_TYPE_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    DERIVE_DEVICE_IDS_FIELD_NUMBER: _ClassVar[int]
    VALIDITY_FIELD_NUMBER: _ClassVar[int]
    lot_id: str
    key_source: KeySource
    key_type: KeyType
    item_count: int
    derive_device_ids: bool
    validity: _duration_pb2.Duration
    def __init__(self, lot_id: _Optional[str] = ..., key_source: _Optional[_Union[KeySource, str]] = ..., key_type: _Optional[_Union[KeyType, str]] = ..., item_count: _Optional[int] = ..., derive_device_ids: _Optional[bool] = ..., validity: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class LotItem(_message.Message):
    __slots__ = ("index", "device_id", "csr_pem")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CSR_PEM_FIELD_NUMBER: _ClassVar[int]
    index: int
    device_id: str
    csr_pem: str
    def __init__(self, index: _Optional[int] = ..., device_id: _Optional[str] = ..., csr_pem: _Optional[str] = ...) -> None: ...

class LotItems(_message.Message):
    __slots__ = ("items",)
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    items: _containers.RepeatedCompositeFieldContainer[LotItem]
    def __init__(self, items: _Optional[_Iterable[_Union[LotItem, _Mapping]]] = ...) -> None: ...

class LotAck(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class MintCertificatesRequest(_message.Message):
    __slots__ = ("header", "items", "ack")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    ACK_FIELD_NUMBER: _ClassVar[int]
    header: LotHeader
    items: LotItems
    ack: LotAck
    def __init__(self, header: _Optional[_Union[LotHeader, _Mapping]] = ..., items: _Optional[_Union[LotItems, _Mapping]] = ..., ack: _Optional[_Union[LotAck, _Mapping]] = ...) -> None: ...

class LotItemError(_message.Message):
    __slots__ = ("code", "reason", "message")
    CODE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    code: str
    reason: str
    message: str
    def __init__(self, code: _Optional[str] = ..., reason: _Optional[str] = ..., message: _Optional[str] = ...) -> None: ...

class LotItemResult(_message.Message):
    __slots__ = ("index", "device_id", "certificate", "private_key_pem", "replayed", "error")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    PRIVATE_KEY_PEM_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    index: int
    device_id: str
    certificate: IssuedCertificate
    private_key_pem: str
    replayed: bool
    error: LotItemError
    def __init__(self, index: _Optional[int] = ..., device_id: _Optional[str] = ..., certificate: _Optional[_Union[IssuedCertificate, _Mapping]] = ..., private_key_pem: _Optional[str] = ..., replayed: _Optional[bool] = ..., error: _Optional[_Union[LotItemError, _Mapping]] = ...) -> None: ...

class LotSummary(_message.Message):
    __slots__ = ("lot_id", "item_count", "issued_count", "replayed_count", "failed_count")
    LOT_ID_FIELD_NUMBER: _ClassVar[int]
    ITEM_COUNT_FIELD_NUMBER: _ClassVar[int]
    ISSUED_COUNT_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_COUNT_FIELD_NUMBER: _ClassVar[int]
    FAILED_COUNT_FIELD_NUMBER: _ClassVar[int]
    lot_id: str
    item_count: int
    issued_count: int
    replayed_count: int
    failed_count: int
    def __init__(self, lot_id: _Optional[str] = ..., item_count: _Optional[int] = ..., issued_count: _Optional[int] = ..., replayed_count: _Optional[int] = ..., failed_count: _Optional[int] = ...) -> None: ...

class LotItemResults(_message.Message):
    __slots__ = ("results",)
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    results: _containers.RepeatedCompositeFieldContainer[LotItemResult]
    def __init__(self, results: _Optional[_Iterable[_Union[LotItemResult, _Mapping]]] = ...) -> None: ...

class MintCertificatesResponse(_message.Message):
    __slots__ = ("results", "summary")
    RESULTS_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    results: LotItemResults
    summary: LotSummary
    def __init__(self, results: _Optional[_Union[LotItemResults, _Mapping]] = ..., summary: _Optional[_Union[LotSummary, _Mapping]] = ...) -> None: ...
