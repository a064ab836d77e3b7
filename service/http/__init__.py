"""The HTTP layer: the Litestar app and its routes, request parsing, auth, errors, OpenAPI, limits, metrics."""
