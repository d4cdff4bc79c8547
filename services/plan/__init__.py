"""`kvmesh plan`: measure this machine's cost models, simulate the mesh on an operator's traffic, and search
the placements (prefill:decode counts, colocated workers, batch limits) that serve the most requests within the
SLOs per core — DistServe's placement search, with the scheduler's real routing policies in the loop."""
