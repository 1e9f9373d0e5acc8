import datetime

from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Lifecycle(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    LIFECYCLE_UNSPECIFIED: _ClassVar[Lifecycle]
    LIFECYCLE_ENROLLED: _ClassVar[Lifecycle]
    LIFECYCLE_ACTIVATED: _ClassVar[Lifecycle]
    LIFECYCLE_REGISTERED: _ClassVar[Lifecycle]
    LIFECYCLE_DEPROVISIONED: _ClassVar[Lifecycle]

class MetadataChange(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    METADATA_CHANGE_UNSPECIFIED: _ClassVar[MetadataChange]
    METADATA_CHANGE_KEPT: _ClassVar[MetadataChange]
    METADATA_CHANGE_REPLACED: _ClassVar[MetadataChange]
    METADATA_CHANGE_CLEARED: _ClassVar[MetadataChange]

class ActivationPath(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTIVATION_PATH_UNSPECIFIED: _ClassVar[ActivationPath]
    ACTIVATION_PATH_UNCHANGED: _ClassVar[ActivationPath]
    ACTIVATION_PATH_ENROLLMENT: _ClassVar[ActivationPath]
    ACTIVATION_PATH_ENROLLMENT_AND_HUB_TWIN: _ClassVar[ActivationPath]
LIFECYCLE_UNSPECIFIED: Lifecycle
LIFECYCLE_ENROLLED: Lifecycle
LIFECYCLE_ACTIVATED: Lifecycle
LIFECYCLE_REGISTERED: Lifecycle
LIFECYCLE_DEPROVISIONED: Lifecycle
METADATA_CHANGE_UNSPECIFIED: MetadataChange
METADATA_CHANGE_KEPT: MetadataChange
METADATA_CHANGE_REPLACED: MetadataChange
METADATA_CHANGE_CLEARED: MetadataChange
ACTIVATION_PATH_UNSPECIFIED: ActivationPath
ACTIVATION_PATH_UNCHANGED: ActivationPath
ACTIVATION_PATH_ENROLLMENT: ActivationPath
ACTIVATION_PATH_ENROLLMENT_AND_HUB_TWIN: ActivationPath

class ActivateRequest(_message.Message):
    __slots__ = ("device_id", "activation_code", "metadata_json", "hub", "request_id", "expected_enrollment_etag", "clear_metadata")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_CODE_FIELD_NUMBER: _ClassVar[int]
    METADATA_JSON_FIELD_NUMBER: _ClassVar[int]
    HUB_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_ENROLLMENT_ETAG_FIELD_NUMBER: _ClassVar[int]
    CLEAR_METADATA_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    activation_code: str
    metadata_json: str
    hub: str
    request_id: str
    expected_enrollment_etag: str
    clear_metadata: bool
    def __init__(self, device_id: _Optional[str] = ..., activation_code: _Optional[str] = ..., metadata_json: _Optional[str] = ..., hub: _Optional[str] = ..., request_id: _Optional[str] = ..., expected_enrollment_etag: _Optional[str] = ..., clear_metadata: _Optional[bool] = ...) -> None: ...

class ActivateResponse(_message.Message):
    __slots__ = ("device_id", "hub", "path", "lifecycle", "enrollment_etag", "registered_hub", "replayed", "owner_oem", "metadata_change")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    HUB_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    LIFECYCLE_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_ETAG_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_HUB_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    OWNER_OEM_FIELD_NUMBER: _ClassVar[int]
    METADATA_CHANGE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    hub: str
    path: ActivationPath
    lifecycle: Lifecycle
    enrollment_etag: str
    registered_hub: str
    replayed: bool
    owner_oem: str
    metadata_change: MetadataChange
    def __init__(self, device_id: _Optional[str] = ..., hub: _Optional[str] = ..., path: _Optional[_Union[ActivationPath, str]] = ..., lifecycle: _Optional[_Union[Lifecycle, str]] = ..., enrollment_etag: _Optional[str] = ..., registered_hub: _Optional[str] = ..., replayed: _Optional[bool] = ..., owner_oem: _Optional[str] = ..., metadata_change: _Optional[_Union[MetadataChange, str]] = ...) -> None: ...

class DeactivateRequest(_message.Message):
    __slots__ = ("device_id", "activation_code", "request_id")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_CODE_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    activation_code: str
    request_id: str
    def __init__(self, device_id: _Optional[str] = ..., activation_code: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class DeactivateResponse(_message.Message):
    __slots__ = ("device_id", "changed", "hub_device_disabled", "lifecycle", "replayed")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    HUB_DEVICE_DISABLED_FIELD_NUMBER: _ClassVar[int]
    LIFECYCLE_FIELD_NUMBER: _ClassVar[int]
    REPLAYED_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    changed: bool
    hub_device_disabled: bool
    lifecycle: Lifecycle
    replayed: bool
    def __init__(self, device_id: _Optional[str] = ..., changed: _Optional[bool] = ..., hub_device_disabled: _Optional[bool] = ..., lifecycle: _Optional[_Union[Lifecycle, str]] = ..., replayed: _Optional[bool] = ...) -> None: ...

class GetDeviceStatusRequest(_message.Message):
    __slots__ = ("device_id", "activation_code")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    ACTIVATION_CODE_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    activation_code: str
    def __init__(self, device_id: _Optional[str] = ..., activation_code: _Optional[str] = ...) -> None: ...

class GetDeviceStatusResponse(_message.Message):
    __slots__ = ("device_id", "lifecycle", "provisioning_status", "allocated_hub", "registered_hub", "hub_device_status", "hub_connection_state", "last_activity_time", "activated_time", "deactivated_time", "owner_oem", "enrollment_etag")
    DEVICE_ID_FIELD_NUMBER: _ClassVar[int]
    LIFECYCLE_FIELD_NUMBER: _ClassVar[int]
    PROVISIONING_STATUS_FIELD_NUMBER: _ClassVar[int]
    ALLOCATED_HUB_FIELD_NUMBER: _ClassVar[int]
    REGISTERED_HUB_FIELD_NUMBER: _ClassVar[int]
    HUB_DEVICE_STATUS_FIELD_NUMBER: _ClassVar[int]
    HUB_CONNECTION_STATE_FIELD_NUMBER: _ClassVar[int]
    LAST_ACTIVITY_TIME_FIELD_NUMBER: _ClassVar[int]
    ACTIVATED_TIME_FIELD_NUMBER: _ClassVar[int]
    DEACTIVATED_TIME_FIELD_NUMBER: _ClassVar[int]
    OWNER_OEM_FIELD_NUMBER: _ClassVar[int]
    ENROLLMENT_ETAG_FIELD_NUMBER: _ClassVar[int]
    device_id: str
    lifecycle: Lifecycle
    provisioning_status: str
    allocated_hub: str
    registered_hub: str
    hub_device_status: str
    hub_connection_state: str
    last_activity_time: _timestamp_pb2.Timestamp
    activated_time: _timestamp_pb2.Timestamp
    deactivated_time: _timestamp_pb2.Timestamp
    owner_oem: str
    enrollment_etag: str
    def __init__(self, device_id: _Optional[str] = ..., lifecycle: _Optional[_Union[Lifecycle, str]] = ..., provisioning_status: _Optional[str] = ..., allocated_hub: _Optional[str] = ..., registered_hub: _Optional[str] = ..., hub_device_status: _Optional[str] = ..., hub_connection_state: _Optional[str] = ..., last_activity_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., activated_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., deactivated_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., owner_oem: _Optional[str] = ..., enrollment_etag: _Optional[str] = ...) -> None: ...

class GetMetadataTemplateRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetMetadataTemplateResponse(_message.Message):
    __slots__ = ("tenant", "schema_json", "schema_digest")
    TENANT_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_JSON_FIELD_NUMBER: _ClassVar[int]
    SCHEMA_DIGEST_FIELD_NUMBER: _ClassVar[int]
    tenant: str
    schema_json: str
    schema_digest: str
    def __init__(self, tenant: _Optional[str] = ..., schema_json: _Optional[str] = ..., schema_digest: _Optional[str] = ...) -> None: ...
