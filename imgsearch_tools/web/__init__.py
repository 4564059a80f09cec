"""The JSON door: the gateway's methods as HTTP/JSON, an OpenAPI description, a search page."""
