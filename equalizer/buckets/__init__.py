"""Token buckets: the maths, the store interface, the memory and PostgreSQL stores, leasing."""
