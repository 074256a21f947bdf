from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Module(_message.Message):
    __slots__ = ("name", "out_features", "in_features", "rank")
    NAME_FIELD_NUMBER: _ClassVar[int]
    OUT_FEATURES_FIELD_NUMBER: _ClassVar[int]
    IN_FEATURES_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    name: str
    out_features: int
    in_features: int
    rank: int
    def __init__(self, name: _Optional[str] = ..., out_features: _Optional[int] = ..., in_features: _Optional[int] = ..., rank: _Optional[int] = ...) -> None: ...

class SiteManifest(_message.Message):
    __slots__ = ("base_model", "modules", "tasks", "upload_kind", "sketch_rank", "lora_numbers", "canonicalize", "tool_version", "calibration")
    BASE_MODEL_FIELD_NUMBER: _ClassVar[int]
    MODULES_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    UPLOAD_KIND_FIELD_NUMBER: _ClassVar[int]
    SKETCH_RANK_FIELD_NUMBER: _ClassVar[int]
    LORA_NUMBERS_FIELD_NUMBER: _ClassVar[int]
    CANONICALIZE_FIELD_NUMBER: _ClassVar[int]
    TOOL_VERSION_FIELD_NUMBER: _ClassVar[int]
    CALIBRATION_FIELD_NUMBER: _ClassVar[int]
    base_model: str
    modules: _containers.RepeatedCompositeFieldContainer[Module]
    tasks: _containers.RepeatedScalarFieldContainer[str]
    upload_kind: str
    sketch_rank: int
    lora_numbers: int
    canonicalize: bool
    tool_version: str
    calibration: bool
    def __init__(self, base_model: _Optional[str] = ..., modules: _Optional[_Iterable[_Union[Module, _Mapping]]] = ..., tasks: _Optional[_Iterable[str]] = ..., upload_kind: _Optional[str] = ..., sketch_rank: _Optional[int] = ..., lora_numbers: _Optional[int] = ..., canonicalize: _Optional[bool] = ..., tool_version: _Optional[str] = ..., calibration: _Optional[bool] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("federation_id", "site_id", "manifest")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    MANIFEST_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    site_id: str
    manifest: SiteManifest
    def __init__(self, federation_id: _Optional[str] = ..., site_id: _Optional[str] = ..., manifest: _Optional[_Union[SiteManifest, _Mapping]] = ...) -> None: ...

class JoinResponse(_message.Message):
    __slots__ = ("federation_config_json",)
    FEDERATION_CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    federation_config_json: str
    def __init__(self, federation_config_json: _Optional[str] = ...) -> None: ...

class MissingChunksRequest(_message.Message):
    __slots__ = ("federation_id", "site_id", "sha256")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    site_id: str
    sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, federation_id: _Optional[str] = ..., site_id: _Optional[str] = ..., sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class MissingChunksResponse(_message.Message):
    __slots__ = ("sha256",)
    SHA256_FIELD_NUMBER: _ClassVar[int]
    sha256: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, sha256: _Optional[_Iterable[str]] = ...) -> None: ...

class UploadChunkRequest(_message.Message):
    __slots__ = ("federation_id", "site_id", "sha256", "data")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    site_id: str
    sha256: str
    data: bytes
    def __init__(self, federation_id: _Optional[str] = ..., site_id: _Optional[str] = ..., sha256: _Optional[str] = ..., data: _Optional[bytes] = ...) -> None: ...

class UploadChunkResponse(_message.Message):
    __slots__ = ("already_stored",)
    ALREADY_STORED_FIELD_NUMBER: _ClassVar[int]
    already_stored: bool
    def __init__(self, already_stored: _Optional[bool] = ...) -> None: ...

class Part(_message.Message):
    __slots__ = ("name", "chunks", "sha256", "size")
    NAME_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    SIZE_FIELD_NUMBER: _ClassVar[int]
    name: str
    chunks: _containers.RepeatedScalarFieldContainer[str]
    sha256: str
    size: int
    def __init__(self, name: _Optional[str] = ..., chunks: _Optional[_Iterable[str]] = ..., sha256: _Optional[str] = ..., size: _Optional[int] = ...) -> None: ...

class CommitRequest(_message.Message):
    __slots__ = ("federation_id", "site_id", "parts")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    PARTS_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    site_id: str
    parts: _containers.RepeatedCompositeFieldContainer[Part]
    def __init__(self, federation_id: _Optional[str] = ..., site_id: _Optional[str] = ..., parts: _Optional[_Iterable[_Union[Part, _Mapping]]] = ...) -> None: ...

class CommitResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class StatusRequest(_message.Message):
    __slots__ = ("federation_id", "site_id", "wait", "timeout_seconds")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    WAIT_FIELD_NUMBER: _ClassVar[int]
    TIMEOUT_SECONDS_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    site_id: str
    wait: bool
    timeout_seconds: float
    def __init__(self, federation_id: _Optional[str] = ..., site_id: _Optional[str] = ..., wait: _Optional[bool] = ..., timeout_seconds: _Optional[float] = ...) -> None: ...

class StatusResponse(_message.Message):
    __slots__ = ("state", "joined_sites", "committed_sites", "min_sites", "message", "basis_sha256", "basis_size", "uploaded")
    STATE_FIELD_NUMBER: _ClassVar[int]
    JOINED_SITES_FIELD_NUMBER: _ClassVar[int]
    COMMITTED_SITES_FIELD_NUMBER: _ClassVar[int]
    MIN_SITES_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    BASIS_SHA256_FIELD_NUMBER: _ClassVar[int]
    BASIS_SIZE_FIELD_NUMBER: _ClassVar[int]
    UPLOADED_FIELD_NUMBER: _ClassVar[int]
    state: str
    joined_sites: _containers.RepeatedScalarFieldContainer[str]
    committed_sites: _containers.RepeatedScalarFieldContainer[str]
    min_sites: int
    message: str
    basis_sha256: str
    basis_size: int
    uploaded: bool
    def __init__(self, state: _Optional[str] = ..., joined_sites: _Optional[_Iterable[str]] = ..., committed_sites: _Optional[_Iterable[str]] = ..., min_sites: _Optional[int] = ..., message: _Optional[str] = ..., basis_sha256: _Optional[str] = ..., basis_size: _Optional[int] = ..., uploaded: _Optional[bool] = ...) -> None: ...

class DownloadRequest(_message.Message):
    __slots__ = ("federation_id", "site_id", "offset")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    site_id: str
    offset: int
    def __init__(self, federation_id: _Optional[str] = ..., site_id: _Optional[str] = ..., offset: _Optional[int] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("offset", "data", "sha256")
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    offset: int
    data: bytes
    sha256: str
    def __init__(self, offset: _Optional[int] = ..., data: _Optional[bytes] = ..., sha256: _Optional[str] = ...) -> None: ...

class ReportRequest(_message.Message):
    __slots__ = ("federation_id", "site_id")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    site_id: str
    def __init__(self, federation_id: _Optional[str] = ..., site_id: _Optional[str] = ...) -> None: ...

class ReportResponse(_message.Message):
    __slots__ = ("json",)
    JSON_FIELD_NUMBER: _ClassVar[int]
    json: str
    def __init__(self, json: _Optional[str] = ...) -> None: ...

class PublishedTask(_message.Message):
    __slots__ = ("name", "task_json", "coefficients", "extras")
    NAME_FIELD_NUMBER: _ClassVar[int]
    TASK_JSON_FIELD_NUMBER: _ClassVar[int]
    COEFFICIENTS_FIELD_NUMBER: _ClassVar[int]
    EXTRAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    task_json: str
    coefficients: Part
    extras: Part
    def __init__(self, name: _Optional[str] = ..., task_json: _Optional[str] = ..., coefficients: _Optional[_Union[Part, _Mapping]] = ..., extras: _Optional[_Union[Part, _Mapping]] = ...) -> None: ...

class PublishRequest(_message.Message):
    __slots__ = ("federation_id", "site_id", "tasks")
    FEDERATION_ID_FIELD_NUMBER: _ClassVar[int]
    SITE_ID_FIELD_NUMBER: _ClassVar[int]
    TASKS_FIELD_NUMBER: _ClassVar[int]
    federation_id: str
    site_id: str
    tasks: _containers.RepeatedCompositeFieldContainer[PublishedTask]
    def __init__(self, federation_id: _Optional[str] = ..., site_id: _Optional[str] = ..., tasks: _Optional[_Iterable[_Union[PublishedTask, _Mapping]]] = ...) -> None: ...

class PublishResponse(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...
