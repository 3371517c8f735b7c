"""What the front ends share: request building (bounds, adapter resolution, tokenizing), chat templates,
auth, metrics and the status table."""
