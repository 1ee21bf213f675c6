"""Model-family mapping tables and the sharding rule types."""
