"""Pieces shared by factory_svc and activation_svc: gRPC server plumbing, error mapping, settings, logging,
and the adapters to the Azure service SDKs."""
