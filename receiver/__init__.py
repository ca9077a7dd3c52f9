"""receiver: a webhook receiver and job tracker for Midjourney-style image APIs."""

__version__ = "0.1.0"
