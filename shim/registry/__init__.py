"""Registry transport: push and pull blobs between an OCI distribution registry and byte ranges
of local files. Imported only by commands that talk to a registry (never on the runtime's
passthrough path): it pulls in urllib3.

  transport.Settings   how to reach registries (credentials file, CA bundle, insecure hosts)
  client.RegistryClient   the distribution API of one registry (blobs, manifests, tags)
  blobs.BlobRange      a blob as bytes [offset, offset+size) of a local file
  download             one blob fetched into its range: verified while streaming, resumable
  transfer.push_blobs / pull_blobs   many blobs in parallel, resumable pulls, progress
  errors               RegistryError and its subclasses
"""
