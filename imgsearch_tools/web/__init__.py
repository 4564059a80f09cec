"""`imgsearch web`: the gateway's methods as HTTP/JSON, an OpenAPI description and a search page."""
