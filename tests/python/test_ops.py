"""Health and reflection as grpcio's own clients see them."""
from google.protobuf.descriptor_pool import DescriptorPool
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha.proto_reflection_descriptor_database import ProtoReflectionDescriptorDatabase


def test_health_is_serving(server):
    with server.channel() as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ["", "layerd.v1.LayerService"]:
            answer = health.Check(health_pb2.HealthCheckRequest(service=service))
            assert answer.status == health_pb2.HealthCheckResponse.SERVING


def test_reflection_describes_the_service_without_the_proto(server):
    with server.channel() as channel:
        database = ProtoReflectionDescriptorDatabase(channel)
        assert "layerd.v1.LayerService" in database.get_services()
        pool = DescriptorPool(database)
        service = pool.FindServiceByName("layerd.v1.LayerService")
        assert [m.name for m in service.methods] == [
            "CreateSession", "CloseSession", "DescribeSession", "CreateLayer", "Forward", "Backward", "Run", "ListLayerKinds",
            "GetParams", "SetParams", "CreateOptimizer", "Step", "TrainStep", "ExportSession", "ImportSession"]
        tensor = pool.FindMessageTypeByName("layerd.v1.Tensor")
        assert [(f.name, f.number) for f in tensor.fields] == [("dtype", 1), ("shape", 2), ("data", 3)]
