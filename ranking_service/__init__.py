"""Ranking service: rankers (none, popularity, ALS, FM, DeepFM), training and RankingService."""
