"""Routes and pools (SPEC 8): which pool, policy and header changes a request gets."""
