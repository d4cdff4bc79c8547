"""Clients of mesh services that more than one service uses (the cache client), so that no service package
imports another's: scheduler, prefill and decode import these, never `kvmesh.services.cache`; and the command
line's client of the gateway (`kvmesh up --once`)."""
