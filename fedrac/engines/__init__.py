"""Engines that run a Flower ServerApp/ClientApp pair."""
