"""The detection study on the real-photo corpus: signals, combiner, thresholds, adaptive attack."""
