"""Node resources, one owner each: the config, the store, per-container state, events, metrics,
restore cgroups and the provenance the store records. Uses drivers and oci/ only."""
