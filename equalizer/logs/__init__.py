"""Logging: line formats, rotating files, the access log."""
