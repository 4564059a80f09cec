"""Tests of the JSON door (both deployments), its OpenAPI description and the search page."""
