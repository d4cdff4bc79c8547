"""kvmesh: disaggregated LLM serving."""
