from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JobState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    JOB_STATE_UNSPECIFIED: _ClassVar[JobState]
    JOB_STATE_PENDING: _ClassVar[JobState]
    JOB_STATE_RUNNING: _ClassVar[JobState]
    JOB_STATE_RECOVERING: _ClassVar[JobState]
    JOB_STATE_BISECTING: _ClassVar[JobState]
    JOB_STATE_SUCCEEDED: _ClassVar[JobState]
    JOB_STATE_FAILED: _ClassVar[JobState]
    JOB_STATE_CANCELLED: _ClassVar[JobState]

class WorkerState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WORKER_STATE_UNSPECIFIED: _ClassVar[WorkerState]
    WORKER_STATE_STANDBY: _ClassVar[WorkerState]
    WORKER_STATE_STARTING: _ClassVar[WorkerState]
    WORKER_STATE_TRAINING: _ClassVar[WorkerState]
    WORKER_STATE_WAITING: _ClassVar[WorkerState]
    WORKER_STATE_EXITED: _ClassVar[WorkerState]
    WORKER_STATE_FAILED: _ClassVar[WorkerState]
    WORKER_STATE_HUNG: _ClassVar[WorkerState]

class HealthVerdict(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HEALTH_VERDICT_UNSPECIFIED: _ClassVar[HealthVerdict]
    HEALTH_VERDICT_HEALTHY: _ClassVar[HealthVerdict]
    HEALTH_VERDICT_DEGRADED: _ClassVar[HealthVerdict]
    HEALTH_VERDICT_UNHEALTHY: _ClassVar[HealthVerdict]

class NodeState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    NODE_STATE_UNSPECIFIED: _ClassVar[NodeState]
    NODE_STATE_READY: _ClassVar[NodeState]
    NODE_STATE_CORDONED: _ClassVar[NodeState]
    NODE_STATE_DRAINING: _ClassVar[NodeState]
    NODE_STATE_LOST: _ClassVar[NodeState]
JOB_STATE_UNSPECIFIED: JobState
JOB_STATE_PENDING: JobState
JOB_STATE_RUNNING: JobState
JOB_STATE_RECOVERING: JobState
JOB_STATE_BISECTING: JobState
JOB_STATE_SUCCEEDED: JobState
JOB_STATE_FAILED: JobState
JOB_STATE_CANCELLED: JobState
WORKER_STATE_UNSPECIFIED: WorkerState
WORKER_STATE_STANDBY: WorkerState
WORKER_STATE_STARTING: WorkerState
WORKER_STATE_TRAINING: WorkerState
WORKER_STATE_WAITING: WorkerState
WORKER_STATE_EXITED: WorkerState
WORKER_STATE_FAILED: WorkerState
WORKER_STATE_HUNG: WorkerState
HEALTH_VERDICT_UNSPECIFIED: HealthVerdict
HEALTH_VERDICT_HEALTHY: HealthVerdict
HEALTH_VERDICT_DEGRADED: HealthVerdict
HEALTH_VERDICT_UNHEALTHY: HealthVerdict
NODE_STATE_UNSPECIFIED: NodeState
NODE_STATE_READY: NodeState
NODE_STATE_CORDONED: NodeState
NODE_STATE_DRAINING: NodeState
NODE_STATE_LOST: NodeState

class GpuInfo(_message.Message):
    __slots__ = ("index", "uuid", "name", "memory_total_bytes")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    UUID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    index: int
    uuid: str
    name: str
    memory_total_bytes: int
    def __init__(self, index: _Optional[int] = ..., uuid: _Optional[str] = ..., name: _Optional[str] = ..., memory_total_bytes: _Optional[int] = ...) -> None: ...

class NodeInventory(_message.Message):
    __slots__ = ("host", "addresses", "gpus", "cpu_count", "memory_total_bytes", "agent_version", "workers", "spare", "store_port")
    HOST_FIELD_NUMBER: _ClassVar[int]
    ADDRESSES_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    CPU_COUNT_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOTAL_BYTES_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    SPARE_FIELD_NUMBER: _ClassVar[int]
    STORE_PORT_FIELD_NUMBER: _ClassVar[int]
    host: str
    addresses: _containers.RepeatedScalarFieldContainer[str]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuInfo]
    cpu_count: int
    memory_total_bytes: int
    agent_version: str
    workers: int
    spare: bool
    store_port: int
    def __init__(self, host: _Optional[str] = ..., addresses: _Optional[_Iterable[str]] = ..., gpus: _Optional[_Iterable[_Union[GpuInfo, _Mapping]]] = ..., cpu_count: _Optional[int] = ..., memory_total_bytes: _Optional[int] = ..., agent_version: _Optional[str] = ..., workers: _Optional[int] = ..., spare: _Optional[bool] = ..., store_port: _Optional[int] = ...) -> None: ...

class SkipWindow(_message.Message):
    __slots__ = ("start", "length")
    START_FIELD_NUMBER: _ClassVar[int]
    LENGTH_FIELD_NUMBER: _ClassVar[int]
    start: int
    length: int
    def __init__(self, start: _Optional[int] = ..., length: _Optional[int] = ...) -> None: ...

class WorkerStatus(_message.Message):
    __slots__ = ("local_rank", "rank", "state", "pid", "step", "step_time_s", "exit_code", "exit_reason", "generation")
    LOCAL_RANK_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    EXIT_CODE_FIELD_NUMBER: _ClassVar[int]
    EXIT_REASON_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    local_rank: int
    rank: int
    state: WorkerState
    pid: int
    step: int
    step_time_s: float
    exit_code: int
    exit_reason: str
    generation: int
    def __init__(self, local_rank: _Optional[int] = ..., rank: _Optional[int] = ..., state: _Optional[_Union[WorkerState, str]] = ..., pid: _Optional[int] = ..., step: _Optional[int] = ..., step_time_s: _Optional[float] = ..., exit_code: _Optional[int] = ..., exit_reason: _Optional[str] = ..., generation: _Optional[int] = ...) -> None: ...

class Event(_message.Message):
    __slots__ = ("kind", "job_id", "generation", "step", "rank", "suspect_ranks", "time", "detail_json", "seq", "node_id")
    KIND_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    RANK_FIELD_NUMBER: _ClassVar[int]
    SUSPECT_RANKS_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    DETAIL_JSON_FIELD_NUMBER: _ClassVar[int]
    SEQ_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    kind: str
    job_id: str
    generation: int
    step: int
    rank: int
    suspect_ranks: _containers.RepeatedScalarFieldContainer[int]
    time: float
    detail_json: str
    seq: int
    node_id: str
    def __init__(self, kind: _Optional[str] = ..., job_id: _Optional[str] = ..., generation: _Optional[int] = ..., step: _Optional[int] = ..., rank: _Optional[int] = ..., suspect_ranks: _Optional[_Iterable[int]] = ..., time: _Optional[float] = ..., detail_json: _Optional[str] = ..., seq: _Optional[int] = ..., node_id: _Optional[str] = ...) -> None: ...

class Node(_message.Message):
    __slots__ = ("node_id", "state", "inventory", "health", "health_reason", "last_heartbeat_time", "job_id", "node_rank", "reason")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    HEALTH_REASON_FIELD_NUMBER: _ClassVar[int]
    LAST_HEARTBEAT_TIME_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_RANK_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    state: NodeState
    inventory: NodeInventory
    health: HealthVerdict
    health_reason: str
    last_heartbeat_time: float
    job_id: str
    node_rank: int
    reason: str
    def __init__(self, node_id: _Optional[str] = ..., state: _Optional[_Union[NodeState, str]] = ..., inventory: _Optional[_Union[NodeInventory, _Mapping]] = ..., health: _Optional[_Union[HealthVerdict, str]] = ..., health_reason: _Optional[str] = ..., last_heartbeat_time: _Optional[float] = ..., job_id: _Optional[str] = ..., node_rank: _Optional[int] = ..., reason: _Optional[str] = ...) -> None: ...

class Checkpoint(_message.Message):
    __slots__ = ("job_id", "step", "path", "good", "reason", "time", "fingerprint")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    GOOD_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    step: int
    path: str
    good: bool
    reason: str
    time: float
    fingerprint: str
    def __init__(self, job_id: _Optional[str] = ..., step: _Optional[int] = ..., path: _Optional[str] = ..., good: _Optional[bool] = ..., reason: _Optional[str] = ..., time: _Optional[float] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class Decision(_message.Message):
    __slots__ = ("seq", "time", "event", "from_state", "to_state", "reason", "actions", "generation")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    TIME_FIELD_NUMBER: _ClassVar[int]
    EVENT_FIELD_NUMBER: _ClassVar[int]
    FROM_STATE_FIELD_NUMBER: _ClassVar[int]
    TO_STATE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ACTIONS_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    seq: int
    time: float
    event: str
    from_state: JobState
    to_state: JobState
    reason: str
    actions: _containers.RepeatedScalarFieldContainer[str]
    generation: int
    def __init__(self, seq: _Optional[int] = ..., time: _Optional[float] = ..., event: _Optional[str] = ..., from_state: _Optional[_Union[JobState, str]] = ..., to_state: _Optional[_Union[JobState, str]] = ..., reason: _Optional[str] = ..., actions: _Optional[_Iterable[str]] = ..., generation: _Optional[int] = ...) -> None: ...

class Job(_message.Message):
    __slots__ = ("job_id", "name", "state", "generation", "step", "steps_total", "nodes", "restarts", "created_time", "updated_time", "reason", "spec_toml", "last_good_checkpoint_step", "skip_windows", "goodput_ratio", "final_fingerprint", "workers_per_node")
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    STEP_FIELD_NUMBER: _ClassVar[int]
    STEPS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    NODES_FIELD_NUMBER: _ClassVar[int]
    RESTARTS_FIELD_NUMBER: _ClassVar[int]
    CREATED_TIME_FIELD_NUMBER: _ClassVar[int]
    UPDATED_TIME_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    SPEC_TOML_FIELD_NUMBER: _ClassVar[int]
    LAST_GOOD_CHECKPOINT_STEP_FIELD_NUMBER: _ClassVar[int]
    SKIP_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    GOODPUT_RATIO_FIELD_NUMBER: _ClassVar[int]
    FINAL_FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    WORKERS_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    job_id: str
    name: str
    state: JobState
    generation: int
    step: int
    steps_total: int
    nodes: _containers.RepeatedScalarFieldContainer[str]
    restarts: int
    created_time: float
    updated_time: float
    reason: str
    spec_toml: str
    last_good_checkpoint_step: int
    skip_windows: _containers.RepeatedCompositeFieldContainer[SkipWindow]
    goodput_ratio: float
    final_fingerprint: str
    workers_per_node: int
    def __init__(self, job_id: _Optional[str] = ..., name: _Optional[str] = ..., state: _Optional[_Union[JobState, str]] = ..., generation: _Optional[int] = ..., step: _Optional[int] = ..., steps_total: _Optional[int] = ..., nodes: _Optional[_Iterable[str]] = ..., restarts: _Optional[int] = ..., created_time: _Optional[float] = ..., updated_time: _Optional[float] = ..., reason: _Optional[str] = ..., spec_toml: _Optional[str] = ..., last_good_checkpoint_step: _Optional[int] = ..., skip_windows: _Optional[_Iterable[_Union[SkipWindow, _Mapping]]] = ..., goodput_ratio: _Optional[float] = ..., final_fingerprint: _Optional[str] = ..., workers_per_node: _Optional[int] = ...) -> None: ...

class Bisection(_message.Message):
    __slots__ = ("bisection_id", "job_id", "state", "suspects", "faulty", "rounds", "confidence", "reference", "reason", "rounds_json")
    BISECTION_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    SUSPECTS_FIELD_NUMBER: _ClassVar[int]
    FAULTY_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CONFIDENCE_FIELD_NUMBER: _ClassVar[int]
    REFERENCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_JSON_FIELD_NUMBER: _ClassVar[int]
    bisection_id: str
    job_id: str
    state: str
    suspects: _containers.RepeatedScalarFieldContainer[str]
    faulty: _containers.RepeatedScalarFieldContainer[str]
    rounds: int
    confidence: float
    reference: str
    reason: str
    rounds_json: str
    def __init__(self, bisection_id: _Optional[str] = ..., job_id: _Optional[str] = ..., state: _Optional[str] = ..., suspects: _Optional[_Iterable[str]] = ..., faulty: _Optional[_Iterable[str]] = ..., rounds: _Optional[int] = ..., confidence: _Optional[float] = ..., reference: _Optional[str] = ..., reason: _Optional[str] = ..., rounds_json: _Optional[str] = ...) -> None: ...
