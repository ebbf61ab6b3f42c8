"""The transport: grpc.aio app, thin servicers, protobuf <-> dataclass conversion, interceptors."""
