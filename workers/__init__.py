"""Site side of a federation: Ray actors that hold adapter shards, and the gRPC client they use."""
