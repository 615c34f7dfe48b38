"""veil's gRPC server: the wire contract adapted to the engine, with authentication, roles,
limits and health. It is thin; the domain lives in `engine`."""
