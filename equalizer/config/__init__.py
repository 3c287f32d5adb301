"""Configuration: YAML and command-line flags in, frozen config objects out."""
