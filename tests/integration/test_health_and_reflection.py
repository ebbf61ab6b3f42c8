"""Standard tools can talk to the server: grpc.health.v1 and server reflection."""

from __future__ import annotations

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def test_health_reports_serving(server):
    with grpc.insecure_channel(server.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", "impasto.v1.ImageService"):
            response = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert response.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_describes_the_api(server):
    with grpc.insecure_channel(server.target) as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        services = set(database.get_services())
        assert {"impasto.v1.ImageService", "grpc.health.v1.Health"} <= services
        file = database.FindFileContainingSymbol("impasto.v1.ImageService")
        methods = {m.name for m in file.service[0].method}
        assert {"Generate", "ListModels", "ListSamplers", "GetServerInfo"} <= methods
