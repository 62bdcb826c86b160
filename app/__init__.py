"""The clinic app: settings, privacy, and the server that serves the web page (`web/`) and the API
(`api/`) from one process and port. It imports `model`; `model` never imports it."""
