"""`kvmesh worker --role auto`: a worker that serves as prefill or decode, whichever the scheduler asks for."""
