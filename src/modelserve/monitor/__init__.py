"""Monitoring: metrics, the payload log (requests and responses to a database, off the request path),
feedback and quality. Nothing here runs synchronously on the request path but an append to a buffer."""
