"""The snapshot store: the one owner of store_dir. Each part owns its files:

  store_dir/layout/            OCI image layout. index.json names each published snapshot by its
                               ref (NAME:TAG) and owner namespace (dev.thaw.namespace); blobs/
                               holds manifests, configs, the CRIU whole-file tars, rootfs diffs and
                               deleted lists — never a file part                         index.py
  store_dir/images/<hex>/      the CRIU image directory of a snapshot, its .seal and .lock:
                               what a restore reads                                      images.py
  store_dir/staging/<id>/      captures, imports and conversions in progress
  store_dir/pulls/<hex>/       pulls in progress                                         staging.py
  store_dir/locks/             per-snapshot-name locks (auto-capture captures once)      index.py
  store_dir/.lock              serialises index changes and garbage collection           index.py

Sizes, namespace quotas and eviction are limits.py's (it owns no file); store.py's Store holds
the parts and does what spans them (publish, remove, gc, export): callers use only Store.

A snapshot belongs to the namespace the node published it under (dev.thaw.namespace of its
index entry): the one that captured it, or the one a pull or import was made for — never a field
of the snapshot itself. It is found only under that namespace (or by a namespace the node's
policy lets read it). Each index entry also records the snapshot's provenance (shim/node/provenance.py)
and the cosign signatures known for it (exported with it). Each namespace has a byte quota (Store.quota_of);
Store.charged_to names the namespace a snapshot is charged to. It becomes visible only when index.json is
replaced with one naming it, after every blob and file is in place and verified. Everything is
root-only, process memory 0600 or 0400.
"""

from .errors import CorruptSnapshot, QuotaExceeded, SnapshotNotFound, StoreError
from .index import ORIGIN, PROVENANCE, PUSHED, SIGNATURES
from .limits import Evicted
from .staging import CLAIM, Staging
from .store import Store

__all__ = ["CLAIM", "ORIGIN", "PROVENANCE", "PUSHED", "SIGNATURES", "CorruptSnapshot", "Evicted", "QuotaExceeded",
           "SnapshotNotFound", "Staging", "Store", "StoreError"]
