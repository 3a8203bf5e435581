"""The index of names and owners: store_dir/layout/index.json names each published snapshot by
its ref (NAME:TAG) and owner namespace (dev.thaw.namespace), with what the node knows of it
(origin, last push, provenance, signatures). Also the locks of names: store_dir/.lock
serialises index changes and garbage collection, store_dir/locks/ one snapshot name's captures.

A snapshot is visible only once index.json names it; an entry is written last on publish and
removed first on removal, so that no entry is ever without its files."""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import replace

from thaw.oci import cosign
from thaw.oci import snapshot as fmt
from thaw.oci.annotations import SnapshotRef
from thaw.oci.files import make_private_dir
from thaw.oci.layout import REF_NAME, Descriptor, ImageLayout, LayoutError

from ..provenance import Provenance, from_origin, signatures_from_json, signatures_json
from .errors import CorruptSnapshot, SnapshotNotFound, StoreError
from .files import flock

ORIGIN = "dev.thaw.origin"          # index annotation: "captured", "imported", "pulled:REF", "migrated"
PUSHED = "dev.thaw.pushed"          # index annotation: the registry reference it was last pushed to
PROVENANCE = "dev.thaw.provenance"  # index annotation: JSON of provenance.Provenance
SIGNATURES = "dev.thaw.signatures"  # index annotation: JSON list of cosign signatures (payload, signature)


class Index:
    """index.json of the store's layout, its lock, and the per-name locks."""

    def __init__(self, root: str, layout: ImageLayout):
        self.root = root
        self.layout = layout

    # --- locks ------------------------------------------------------------------------------------
    def locked(self) -> contextlib.AbstractContextManager[int]:
        """Serialises index changes and garbage collection."""
        return flock(os.path.join(self.root, ".lock"))

    def name_lock(self, ref: SnapshotRef, namespace: str) -> contextlib.AbstractContextManager[int]:
        """Serialises captures of one snapshot name of one namespace (auto-capture)."""
        locks = make_private_dir(os.path.join(self.root, "locks"))
        return flock(os.path.join(locks, f"{namespace}_{ref.key()}.lock"))

    # --- reading --------------------------------------------------------------------------------
    def entries(self) -> list[Descriptor]:
        return self.layout.read_index() if os.path.exists(self.layout.index_path) else []

    def read(self, desc: Descriptor) -> fmt.Snapshot:
        """The snapshot an index entry names, its manifest and config verified by digest."""
        ann = desc.annotations or {}
        try:
            config_desc, layers = fmt.parse_manifest(self.layout.read_blob(desc, fmt.MAX_META), desc)
            config = fmt.SnapshotConfig.from_json(json.loads(self.layout.read_blob(config_desc, fmt.MAX_META)))
        except (LayoutError, ValueError) as exc:
            raise CorruptSnapshot(f"snapshot {ann.get(REF_NAME, desc.digest)}: {exc}") from exc
        try:
            snap = fmt.assemble(ann.get(REF_NAME, ""), desc, config_desc, config, layers)
        except LayoutError as exc:
            raise CorruptSnapshot(f"snapshot {ann.get(REF_NAME, desc.digest)}: {exc}") from exc
        # The owner is what this node's index says (the config's namespace is only where it was captured).
        owner = ann.get(fmt.NAMESPACE)
        return replace(snap, namespace=owner) if owner else snap

    def snapshots(self, namespace: str | None = None) -> list[fmt.Snapshot]:
        out = []
        for desc in self.entries():
            if namespace is not None and (desc.annotations or {}).get(fmt.NAMESPACE) != namespace:
                continue
            try:
                out.append(self.read(desc))
            except StoreError:
                continue
        return sorted(out, key=lambda s: (s.namespace, s.ref))

    def _annotations(self, snap: fmt.Snapshot, exact: bool = False) -> dict[str, str]:
        """The index annotations of `snap`'s entry (same name, owner and manifest; unless `exact`,
        else the first entry of that manifest)."""
        found: dict[str, str] | None = None
        for desc in self.entries():
            ann = desc.annotations or {}
            if desc.digest == snap.manifest.digest:
                if ann.get(REF_NAME) == snap.ref and ann.get(fmt.NAMESPACE) == snap.namespace:
                    return dict(ann)
                found = dict(ann) if found is None and not exact else found
        return found or {}

    def provenance(self, snap: fmt.Snapshot) -> Provenance:
        """Where the snapshot came from (captured here, signature verified, or accepted unsigned);
        an entry from before provenance existed is read from its origin (provenance.from_origin).
        Only the snapshot's own entry counts: another name of the same manifest may have come
        from elsewhere."""
        ann = self._annotations(snap, exact=True)
        if PROVENANCE in ann:
            try:
                return Provenance.from_json(json.loads(ann[PROVENANCE]))
            except ValueError:
                return Provenance.from_json(None)
        return from_origin(ann.get(ORIGIN, ""))

    def signatures(self, snap: fmt.Snapshot) -> list[cosign.Signature]:
        """The cosign signatures known for the snapshot's manifest (verified at pull or import, or
        made by `thaw push --sign`): export carries them."""
        return signatures_from_json(self._annotations(snap).get(SIGNATURES, ""))

    def origin(self, snap: fmt.Snapshot) -> str:
        """How the snapshot came here: "captured", "imported", "pulled:REF" or "migrated"."""
        return self._annotations(snap).get(ORIGIN, "")

    def pushed(self, snap: fmt.Snapshot) -> str:
        """The registry reference the snapshot was last pushed to; "" if never."""
        return self._annotations(snap).get(PUSHED, "")

    @staticmethod
    def fetchable_again(desc: Descriptor) -> bool:
        """Whether a registry holds the entry's snapshot (pulled, or pushed since): the node
        cache may evict it without store.evict_unpushed."""
        ann = desc.annotations or {}
        return ann.get(ORIGIN, "").startswith("pulled:") or bool(ann.get(PUSHED))

    def _descriptor(self, ref: SnapshotRef, namespace: str) -> Descriptor | None:
        for desc in self.entries():
            ann = desc.annotations or {}
            if ann.get(REF_NAME) == str(ref) and ann.get(fmt.NAMESPACE) == namespace:
                return desc
        return None

    def resolve(self, ref: SnapshotRef, namespace: str, readable_from: tuple[str, ...] = ()) -> fmt.Snapshot:
        """Snapshot `ref` of `namespace`; else of the first namespace in `readable_from` (those
        the node's policy lets publish to this one) that has it."""
        for ns in (namespace, *readable_from):
            desc = self._descriptor(ref, ns)
            if desc is not None:
                return self.read(desc)
        where = namespace + (f" (or {', '.join(readable_from)})" if readable_from else "")
        raise SnapshotNotFound(f"snapshot {ref} not found in namespace {where} of store {self.root}")

    # --- changing (the caller holds locked()) -------------------------------------------------------
    def write(self, entries: list[Descriptor]) -> None:
        self.layout.write_index(entries)

    def publish_locked(self, snap: fmt.Snapshot, origin: str, provenance: Provenance,
                       signatures: list[cosign.Signature] | tuple[cosign.Signature, ...]) -> None:
        """Name `snap` under (snap.namespace, snap.ref), replacing that name's entry; what was
        pushed is kept only if it is the same manifest."""
        index, pushed = [], ""
        for d in self.entries():
            ann = d.annotations or {}
            if ann.get(REF_NAME) == snap.ref and ann.get(fmt.NAMESPACE) == snap.namespace:
                # The registry still holds what was pushed only if this is that manifest.
                pushed = ann.get(PUSHED, "") if d.digest == snap.manifest.digest else ""
                continue
            index.append(d)
        entry = fmt.index_entry(snap)
        ann = {**(entry.annotations or {}), ORIGIN: origin, **({PUSHED: pushed} if pushed else {}),
               PROVENANCE: json.dumps(provenance.to_json()),
               **({SIGNATURES: signatures_json(list(signatures))} if signatures else {})}
        index.append(replace(entry, annotations=ann))
        self.write(index)

    def remove_locked(self, ref: SnapshotRef, namespace: str) -> None:
        index = self.entries()
        kept = [d for d in index if not ((d.annotations or {}).get(REF_NAME) == str(ref)
                                         and (d.annotations or {}).get(fmt.NAMESPACE) == namespace)]
        if len(kept) == len(index):
            raise SnapshotNotFound(f"snapshot {ref} not found in namespace {namespace} of store {self.root}")
        self.write(kept)

    def unpublish_locked(self, manifest_digest: str) -> bool:
        """Remove every entry of a manifest; whether there was one."""
        index = self.entries()
        kept = [d for d in index if d.digest != manifest_digest]
        if len(kept) == len(index):
            return False
        self.write(kept)
        return True

    def mark_pushed(self, snap: fmt.Snapshot, ref: str) -> None:
        """Record that the registry holds `snap` at `ref` (it may then be evicted from the node
        cache: it can be pulled again). Nothing happens if the snapshot is no longer published."""
        with self.locked():
            index = self.entries()
            if not any(d.digest == snap.manifest.digest for d in index):
                return
            self.write([replace(d, annotations={**(d.annotations or {}), PUSHED: ref})
                        if d.digest == snap.manifest.digest else d for d in index])

    def add_signature(self, snap: fmt.Snapshot, signature: cosign.Signature) -> None:
        """Keep a signature made for `snap`'s manifest (`thaw push --sign`) with every entry of it."""
        with self.locked():
            out = []
            for d in self.entries():
                if d.digest == snap.manifest.digest:
                    ann = dict(d.annotations or {})
                    sigs = signatures_from_json(ann.get(SIGNATURES, ""))
                    if signature not in sigs:
                        ann[SIGNATURES] = signatures_json([*sigs, signature])
                    d = replace(d, annotations=ann)
                out.append(d)
            self.write(out)
