"""Generated gRPC stubs of the kvmesh.v1 contract."""
