"""gRPC: the KServe v2 / Triton GRPCInferenceService as a codec over the data plane.

proto/bnserve_inference.proto is the protocol (Triton's field numbers); bnserve_inference_pb2.py
is generated from it and committed (regenerate: python -m service.protocol.grpc.generate);
codec.py translates messages to and from the data plane's typed objects; servicer.py holds the
thin handlers; server.py runs grpcio's asyncio server beside uvicorn.
"""
