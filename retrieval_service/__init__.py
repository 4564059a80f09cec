"""Retrieval service: keyword index, CLIP encoder, FAISS index and the RetrievalService."""
