"""Coordinator: gRPC service, durable state, the job state machine and its single controller."""
