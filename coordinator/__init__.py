"""The federation coordinator: a grpc.aio service that aggregates site uploads into an RMM basis."""
