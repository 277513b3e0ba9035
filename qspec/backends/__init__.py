"""Engines that can run a pairing: qspec's own loop (qspec_loop.py) and transformers' generate
and assisted generation, the peer it is timed against (transformers_peer.py), each behind
`prepare(ctx, cell, target, drafter, prompts)` -> Prepared (interface.py); and the served
engine, vLLM in a process of its own (vllm_server.py starts it, vllm_load.py loads it at a
concurrency level, vllm_metrics.py reads its counters), driven by stages/serving.py."""
