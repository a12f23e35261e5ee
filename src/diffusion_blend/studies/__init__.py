"""Measurement studies (layer 8): how close the blend gets to its exact target."""
