"""reckoning-ray: RECKONING bilevel knowledge encoding, trained with Ray Train and tuned with Ray Tune."""

__version__ = "0.1.0"
