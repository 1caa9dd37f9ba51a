"""The protocol-independent data plane: plane.DataPlane takes and returns the typed objects of
types.py; REST (service/routers/ + protocol/codec.py) and gRPC (protocol/grpc/) are codecs
over it. Nothing is imported here, so low-level modules (batching, model) can use
dataplane.statistics without an import cycle."""
