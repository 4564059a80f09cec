"""Retrieval service: keyword index, CLIP encoder, FAISS vector index and the RetrievalService server."""
