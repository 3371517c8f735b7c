"""The transport-free request path: bounds, adapter resolution, tokenizing, admission, auth, metrics, status."""
