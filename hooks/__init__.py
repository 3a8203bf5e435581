"""thaw's OCI hooks (`thaw-hook prestart`, `thaw-hook poststop`)."""
