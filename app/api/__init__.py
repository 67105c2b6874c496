"""HTTP routes: ingest, admin, Login with Amazon, operations."""
