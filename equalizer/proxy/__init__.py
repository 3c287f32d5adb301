"""The proxy: one client request relayed to a backend, admission, the upstream client."""
