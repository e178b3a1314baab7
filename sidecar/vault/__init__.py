"""The credential vault: secrets and blobs in SQLite, sealed with envelope encryption."""
