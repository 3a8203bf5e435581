"""Registry references (oci/reference.py): grammar, round trip, clear errors."""

from __future__ import annotations

import pytest

from thaw.oci.reference import InvalidReference, Reference, is_registry_reference

DIGEST = "sha256:" + "ab" * 32


@pytest.mark.parametrize("text, registry, repo, tag, digest", [
    ("localhost:5000/r:t", "localhost:5000", "r", "t", None),
    ("localhost/thaw/qwen", "localhost", "thaw/qwen", None, None),
    ("registry.example.com/team/snapshots/qwen3:v1.2_rc-1", "registry.example.com", "team/snapshots/qwen3",
     "v1.2_rc-1", None),
    (f"127.0.0.1:5000/a/b@{DIGEST}", "127.0.0.1:5000", "a/b", None, DIGEST),
    (f"ghcr.io/org/snap:tag@{DIGEST}", "ghcr.io", "org/snap", "tag", DIGEST),
    ("[::1]:5000/r:t", "[::1]:5000", "r", "t", None),
    ("my-registry.local:443/a.b/c__d/e--f:T", "my-registry.local:443", "a.b/c__d/e--f", "T", None),
])
def test_parse_and_round_trip(text, registry, repo, tag, digest):
    ref = Reference.parse(text)
    assert (ref.registry, ref.repository, ref.tag, ref.digest) == (registry, repo, tag, digest)
    assert str(ref) == text
    assert Reference.parse(str(ref)) == ref
    assert ref.reference == (digest or tag or "latest")


@pytest.mark.parametrize("text, fragment", [
    ("qwen:v1", "not a registry reference"),
    ("thaw/qwen:v1", "is not a registry host"),            # no implicit docker.io
    ("library/ubuntu", "is not a registry host"),
    ("/repo:tag", "missing registry host"),
    ("localhost:5000/", "missing repository"),
    ("localhost:5000/Repo:t", "repositories are lowercase"),
    ("localhost:5000/a//b", "invalid repository component ''"),
    ("localhost:5000/a-:t", "invalid repository component 'a-'"),
    ("localhost:5000/_a", "invalid repository component '_a'"),
    ("localhost:5000/a___b", "invalid repository component"),
    ("localhost:5000/r:.t", "invalid tag '.t'"),
    ("localhost:5000/r:" + "t" * 129, "invalid tag"),
    ("localhost:5000/r:", "invalid tag ''"),
    ("localhost:5000/r@sha256:abc", "invalid digest"),
    ("localhost:5000/r@sha512:" + "ab" * 64, "unsupported digest algorithm 'sha512'"),
    ("localhost:5000/r@sha256:" + "AB" * 32, "invalid digest"),
    ("local_host:5000/r", "invalid registry host"),
    ("localhost:99999/r", "invalid port"),
    ("localhost:/r", "invalid registry host"),
    ("example.com/" + "a" * 250, "longer than 255"),
    ("", "empty"),
])
def test_invalid_references_say_what_is_wrong(text, fragment):
    with pytest.raises(InvalidReference) as err:
        Reference.parse(text)
    assert fragment in str(err.value)


def test_a_value_is_a_registry_reference_exactly_when_it_has_a_slash():
    assert is_registry_reference("localhost:5000/r:t")
    assert not is_registry_reference("qwen:v1")
    assert not is_registry_reference("localhost:5000")


def test_with_digest_pins_a_tagged_reference():
    ref = Reference.parse("example.com/a/b:v1").with_digest(DIGEST)
    assert str(ref) == f"example.com/a/b:v1@{DIGEST}" and ref.reference == DIGEST
    with pytest.raises(InvalidReference):
        Reference.parse("example.com/a/b:v1").with_digest("sha256:1")
