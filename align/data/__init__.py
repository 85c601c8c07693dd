"""Data: corpus sources and cleaning, token shards and loader, synthetic verifiable tasks, dataset checks."""
