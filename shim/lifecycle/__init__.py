"""The lifecycle of a container: the create decision, restore, capture, auto-capture, recovery,
prefetch, import and distribution. Uses node resources and drivers; never an entry point."""
