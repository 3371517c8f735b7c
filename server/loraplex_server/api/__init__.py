"""The one request path, free of any transport: request_path.py (classify, generate) and admin_path.py
(adapter management) own readiness, bounds and tokenizing (inputs.py), adapter resolution with the task
check and the runtime calls (serving_runtime.py, store I/O off the event loop), the auth policy (auth.py),
metrics and the access log, and the status table (status.py). Tested in process."""
