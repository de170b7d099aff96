"""The monitor as a network service: a FastAPI app that micro-batches concurrent requests into
one forward pass (:mod:`.app`, :mod:`.batching`), and the client `saeguard ood score --url`
uses (:mod:`.client`). `saeguard serve` (:mod:`saeguard.jobs.serve`) starts it under uvicorn."""
