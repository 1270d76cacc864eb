"""Weight distribution: version manifests and checks (``manifest``), the verified download a
sampler does (``transfer``), the HTTP server of versions (``server``), byte deltas between
versions (``delta``) and sharing one copy between processes of a host (``hostshare``)."""
