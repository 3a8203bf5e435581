"""The thaw runtime: argv dispatch, restore, capture, the store, the node fingerprint, CRIU/runc
and CUDA drivers, and the `thaw` CLI."""
