"""Test harness that drives a private containerd through CRI, the way kubelet does.

client.py      CriClient (runtime.v1 over gRPC; stubs compiled from api.proto at import)
containerd.py  Containerd: private containerd 1.6 + CRI + CNI bridge, full cleanup
images.py      pure-Python OCI image builder + `ctr images import`
fixtures.py    pytest fixtures: thaw_runtime_binary, containerd (session), cri (per test)
"""
