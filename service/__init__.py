"""advsentry's sidecar and command line: adapts gRPC, HTTP and the CLI to the detector."""
