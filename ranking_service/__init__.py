"""Ranking service: rankers (none, popularity, ALS, FM, DeepFM), their training and the RankingService server."""
