"""Gateway: the SearchService that fans out to retrieval and ranking."""
