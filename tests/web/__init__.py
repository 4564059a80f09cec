"""Tests of `imgsearch web`: the JSON door, its OpenAPI description and the search page."""
