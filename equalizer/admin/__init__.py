"""The admin REST API, its OpenAPI document and the dashboard page."""
