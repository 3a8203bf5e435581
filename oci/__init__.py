"""OCI formats: runtime-spec bundles, container state, runc argv, image layouts, thaw's snapshot
artifact. Nothing in this package runs a process or knows how runc behaves."""
