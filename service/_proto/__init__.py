"""Generated gRPC stubs of proto/ (service.protogen); do not edit."""
