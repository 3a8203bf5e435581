"""Test harness that drives a private containerd through CRI, the way kubelet does.

client.py      CriClient (runtime.v1 over gRPC; stubs compiled from api.proto at import)
builds.py      the containerd builds tested: the node's (Debian 12: 1.6), trixie's (1.7), sid's (2.x)
containerd.py  Containerd: a private containerd of one build + CRI + CNI bridge, full cleanup
images.py      pure-Python OCI image builder + `ctr images import`
fixtures.py    pytest fixtures: containerd_build (one per build), containerd (session), cri (per test)
"""
