"""The work: request scheduler, step loop, per-request state, samplers, image encoding.

Nothing here imports grpc or protobuf; the rpc layer converts to and from these dataclasses.
"""
