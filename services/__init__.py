"""kvmesh services: the engine, the five gRPC services, the CLI and the launcher."""
