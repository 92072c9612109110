from protos.stanchion.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RegisterRequest(_message.Message):
    __slots__ = ("node_id", "inventory", "job_id", "generation", "workers")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    INVENTORY_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    inventory: _types_pb2.NodeInventory
    job_id: str
    generation: int
    workers: _containers.RepeatedCompositeFieldContainer[_types_pb2.WorkerStatus]
    def __init__(self, node_id: _Optional[str] = ..., inventory: _Optional[_Union[_types_pb2.NodeInventory, _Mapping]] = ..., job_id: _Optional[str] = ..., generation: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[_types_pb2.WorkerStatus, _Mapping]]] = ...) -> None: ...

class RegisterResponse(_message.Message):
    __slots__ = ("heartbeat_interval_ms", "heartbeat_timeout_ms", "last_event_seq")
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    LAST_EVENT_SEQ_FIELD_NUMBER: _ClassVar[int]
    heartbeat_interval_ms: int
    heartbeat_timeout_ms: int
    last_event_seq: int
    def __init__(self, heartbeat_interval_ms: _Optional[int] = ..., heartbeat_timeout_ms: _Optional[int] = ..., last_event_seq: _Optional[int] = ...) -> None: ...

class HeartbeatRequest(_message.Message):
    __slots__ = ("node_id", "job_id", "generation", "workers", "last_step", "step_time_s", "events", "health", "health_reason", "acked_directive_seq", "traces")
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    WORKERS_FIELD_NUMBER: _ClassVar[int]
    LAST_STEP_FIELD_NUMBER: _ClassVar[int]
    STEP_TIME_S_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    HEALTH_FIELD_NUMBER: _ClassVar[int]
    HEALTH_REASON_FIELD_NUMBER: _ClassVar[int]
    ACKED_DIRECTIVE_SEQ_FIELD_NUMBER: _ClassVar[int]
    TRACES_FIELD_NUMBER: _ClassVar[int]
    node_id: str
    job_id: str
    generation: int
    workers: _containers.RepeatedCompositeFieldContainer[_types_pb2.WorkerStatus]
    last_step: int
    step_time_s: float
    events: _containers.RepeatedCompositeFieldContainer[_types_pb2.Event]
    health: _types_pb2.HealthVerdict
    health_reason: str
    acked_directive_seq: int
    traces: _containers.RepeatedCompositeFieldContainer[Trace]
    def __init__(self, node_id: _Optional[str] = ..., job_id: _Optional[str] = ..., generation: _Optional[int] = ..., workers: _Optional[_Iterable[_Union[_types_pb2.WorkerStatus, _Mapping]]] = ..., last_step: _Optional[int] = ..., step_time_s: _Optional[float] = ..., events: _Optional[_Iterable[_Union[_types_pb2.Event, _Mapping]]] = ..., health: _Optional[_Union[_types_pb2.HealthVerdict, str]] = ..., health_reason: _Optional[str] = ..., acked_directive_seq: _Optional[int] = ..., traces: _Optional[_Iterable[_Union[Trace, _Mapping]]] = ...) -> None: ...

class HeartbeatResponse(_message.Message):
    __slots__ = ("directives", "heartbeat_interval_ms")
    DIRECTIVES_FIELD_NUMBER: _ClassVar[int]
    HEARTBEAT_INTERVAL_MS_FIELD_NUMBER: _ClassVar[int]
    directives: _containers.RepeatedCompositeFieldContainer[Directive]
    heartbeat_interval_ms: int
    def __init__(self, directives: _Optional[_Iterable[_Union[Directive, _Mapping]]] = ..., heartbeat_interval_ms: _Optional[int] = ...) -> None: ...

class StartWorkers(_message.Message):
    __slots__ = ("node_rank", "num_nodes", "workers_per_node", "master_addr", "master_port", "resume", "checkpoint", "skip_windows", "config_json", "faults_json", "rollback_to", "fresh_processes", "entrypoint", "args")
    NODE_RANK_FIELD_NUMBER: _ClassVar[int]
    NUM_NODES_FIELD_NUMBER: _ClassVar[int]
    WORKERS_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    MASTER_ADDR_FIELD_NUMBER: _ClassVar[int]
    MASTER_PORT_FIELD_NUMBER: _ClassVar[int]
    RESUME_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    SKIP_WINDOWS_FIELD_NUMBER: _ClassVar[int]
    CONFIG_JSON_FIELD_NUMBER: _ClassVar[int]
    FAULTS_JSON_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_TO_FIELD_NUMBER: _ClassVar[int]
    FRESH_PROCESSES_FIELD_NUMBER: _ClassVar[int]
    ENTRYPOINT_FIELD_NUMBER: _ClassVar[int]
    ARGS_FIELD_NUMBER: _ClassVar[int]
    node_rank: int
    num_nodes: int
    workers_per_node: int
    master_addr: str
    master_port: int
    resume: str
    checkpoint: str
    skip_windows: _containers.RepeatedCompositeFieldContainer[_types_pb2.SkipWindow]
    config_json: str
    faults_json: str
    rollback_to: int
    fresh_processes: bool
    entrypoint: str
    args: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, node_rank: _Optional[int] = ..., num_nodes: _Optional[int] = ..., workers_per_node: _Optional[int] = ..., master_addr: _Optional[str] = ..., master_port: _Optional[int] = ..., resume: _Optional[str] = ..., checkpoint: _Optional[str] = ..., skip_windows: _Optional[_Iterable[_Union[_types_pb2.SkipWindow, _Mapping]]] = ..., config_json: _Optional[str] = ..., faults_json: _Optional[str] = ..., rollback_to: _Optional[int] = ..., fresh_processes: _Optional[bool] = ..., entrypoint: _Optional[str] = ..., args: _Optional[_Iterable[str]] = ...) -> None: ...

class StopWorkers(_message.Message):
    __slots__ = ("reason", "checkpoint")
    REASON_FIELD_NUMBER: _ClassVar[int]
    CHECKPOINT_FIELD_NUMBER: _ClassVar[int]
    reason: str
    checkpoint: bool
    def __init__(self, reason: _Optional[str] = ..., checkpoint: _Optional[bool] = ...) -> None: ...

class Rollback(_message.Message):
    __slots__ = ("request_id", "to_step", "skip", "reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TO_STEP_FIELD_NUMBER: _ClassVar[int]
    SKIP_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: int
    to_step: int
    skip: _containers.RepeatedCompositeFieldContainer[_types_pb2.SkipWindow]
    reason: str
    def __init__(self, request_id: _Optional[int] = ..., to_step: _Optional[int] = ..., skip: _Optional[_Iterable[_Union[_types_pb2.SkipWindow, _Mapping]]] = ..., reason: _Optional[str] = ...) -> None: ...

class MarkCheckpoint(_message.Message):
    __slots__ = ("path", "reason")
    PATH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    path: str
    reason: str
    def __init__(self, path: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class RunTrial(_message.Message):
    __slots__ = ("trial_id", "group_rank", "group_size", "master_addr", "master_port", "steps", "seed", "workers_per_node")
    TRIAL_ID_FIELD_NUMBER: _ClassVar[int]
    GROUP_RANK_FIELD_NUMBER: _ClassVar[int]
    GROUP_SIZE_FIELD_NUMBER: _ClassVar[int]
    MASTER_ADDR_FIELD_NUMBER: _ClassVar[int]
    MASTER_PORT_FIELD_NUMBER: _ClassVar[int]
    STEPS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    WORKERS_PER_NODE_FIELD_NUMBER: _ClassVar[int]
    trial_id: str
    group_rank: int
    group_size: int
    master_addr: str
    master_port: int
    steps: int
    seed: int
    workers_per_node: int
    def __init__(self, trial_id: _Optional[str] = ..., group_rank: _Optional[int] = ..., group_size: _Optional[int] = ..., master_addr: _Optional[str] = ..., master_port: _Optional[int] = ..., steps: _Optional[int] = ..., seed: _Optional[int] = ..., workers_per_node: _Optional[int] = ...) -> None: ...

class Directive(_message.Message):
    __slots__ = ("seq", "job_id", "generation", "start", "stop", "rollback", "trial", "mark")
    SEQ_FIELD_NUMBER: _ClassVar[int]
    JOB_ID_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    ROLLBACK_FIELD_NUMBER: _ClassVar[int]
    TRIAL_FIELD_NUMBER: _ClassVar[int]
    MARK_FIELD_NUMBER: _ClassVar[int]
    seq: int
    job_id: str
    generation: int
    start: StartWorkers
    stop: StopWorkers
    rollback: Rollback
    trial: RunTrial
    mark: MarkCheckpoint
    def __init__(self, seq: _Optional[int] = ..., job_id: _Optional[str] = ..., generation: _Optional[int] = ..., start: _Optional[_Union[StartWorkers, _Mapping]] = ..., stop: _Optional[_Union[StopWorkers, _Mapping]] = ..., rollback: _Optional[_Union[Rollback, _Mapping]] = ..., trial: _Optional[_Union[RunTrial, _Mapping]] = ..., mark: _Optional[_Union[MarkCheckpoint, _Mapping]] = ...) -> None: ...

class Trace(_message.Message):
    __slots__ = ("trial_id", "node_id", "loss_bits", "fingerprints", "ok", "error")
    TRIAL_ID_FIELD_NUMBER: _ClassVar[int]
    NODE_ID_FIELD_NUMBER: _ClassVar[int]
    LOSS_BITS_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINTS_FIELD_NUMBER: _ClassVar[int]
    OK_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    trial_id: str
    node_id: str
    loss_bits: _containers.RepeatedScalarFieldContainer[str]
    fingerprints: _containers.RepeatedScalarFieldContainer[str]
    ok: bool
    error: str
    def __init__(self, trial_id: _Optional[str] = ..., node_id: _Optional[str] = ..., loss_bits: _Optional[_Iterable[str]] = ..., fingerprints: _Optional[_Iterable[str]] = ..., ok: _Optional[bool] = ..., error: _Optional[str] = ...) -> None: ...
